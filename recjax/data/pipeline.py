"""Input pipeline for sequential recommendation: training windows -> batches.

Training examples are *windows* over each user's training sequence (the items
before the validation and test items). A window of length L ends at a target
position e and feeds items [e-L, e) to predict items [e-L+1, e]; the loss is
taken on its last `stride` positions only. Windows end at e, e - stride,
e - 2*stride, ... so every training target is predicted exactly once per epoch:

  stride = 1  one example per target with its full last-L history (RecBole's
              scheme, the strongest per target, and the most compute);
  stride = L  non-overlapping windows, loss on all positions (the SASRec
              paper's way of training, cheapest, but early positions see
              little history);
  in between  every target sees at least L - stride items of history.

`windows_per_user=1` keeps only each user's last window (the original paper's
setting of one sequence per user).

Batches are random access by global step (`source[step]`), so the data order is
a pure function of (seed, step): resuming at step s replays exactly the batches
an uninterrupted run would have seen. Epochs are reshuffled with a permutation
seeded by (seed, epoch) and batches run across epoch boundaries, so no example
is dropped; only the very last batch of the run may be partial, and it is
padded with masked rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import numpy as np


def window_ends(offsets: np.ndarray, stride: int, windows_per_user: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Flat indices of each window's last target and of its user's first item.

  offsets: int64[U + 1] into the flat training items.
  Returns (ends int64[E], starts int64[E]), users in order, windows from the
  end of each sequence backwards.
  """
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  ends, starts = [], []
  for u in range(len(offsets) - 1):
    first, last = int(offsets[u]), int(offsets[u + 1]) - 1
    if last < first + 1:     # fewer than 2 training items: no target
      continue
    e = np.arange(last, first, -stride, dtype=np.int64)
    if windows_per_user > 0:
      e = e[:windows_per_user]
    ends.append(e)
    starts.append(np.full_like(e, first))
  if not ends:
    raise ValueError("no training windows: every user has < 2 training items")
  return np.concatenate(ends), np.concatenate(starts)


def user_target_weights(offsets: np.ndarray, power: float) -> np.ndarray:
  """float32[N]: the loss weight of each flat training item as a target.

  A user with n training targets (n + 1 training items) gets weight n**-power
  on each of them, scaled so that the mean weight over all targets is 1:
  power 0 is the plain per-target mean (heavy users dominate the loss), power
  1 gives every user the same total weight, as the evaluation (one target per
  user) does. A user's first item is never a target; its weight is 0.
  """
  if power < 0:
    raise ValueError(f"input.user_weight_power must be >= 0, got {power}")
  lengths = np.diff(np.asarray(offsets, np.int64))
  targets = np.maximum(lengths - 1, 0)
  per_user = np.where(targets > 0, np.maximum(targets, 1.0) ** -float(power), 0.0)
  total = float((per_user * targets).sum())
  if total <= 0:
    raise ValueError("no training targets to weight")
  per_user *= targets.sum() / total
  weights = np.repeat(per_user, lengths)
  weights[np.asarray(offsets[:-1])[lengths > 0]] = 0.0     # first items: no target
  return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WindowBatcher:
  """Collates windows into `{"inputs", "labels", "mask"[, "weights"]}` batches.

  inputs int32[B, L] (left-padded), labels int32[B, S], mask bool[B, S] where
  S = min(stride, L): the labels of the window's last S positions; with
  `target_weights` also weights float32[B, S], each label's loss weight (0
  where the mask is False).
  """
  items: np.ndarray     # int32[N] flat training items
  ends: np.ndarray      # int64[E]
  starts: np.ndarray    # int64[E]
  max_len: int
  stride: int
  target_weights: np.ndarray | None = None   # float32[N], see user_target_weights

  def __post_init__(self):
    if self.stride > self.max_len:
      raise ValueError(
          f"stride={self.stride} > max_len={self.max_len}: a window labels only its last "
          f"max_len positions, so the {self.stride - self.max_len} targets between two "
          "windows would never be trained; use stride <= max_len")

  @property
  def num_label_positions(self) -> int:
    return min(self.stride, self.max_len)

  def __call__(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
    """example_ids: int64[B], -1 for padding rows."""
    length, s = self.max_len, self.num_label_positions
    real = example_ids >= 0
    ids = np.where(real, example_ids, 0)
    ends, starts = self.ends[ids], self.starts[ids]
    pos = ends[:, None] - length + np.arange(length)[None]     # input positions
    valid = (pos >= starts[:, None]) & real[:, None]
    inputs = np.where(valid, self.items[np.maximum(pos, 0)], 0)
    labels = np.where(valid, self.items[np.maximum(pos + 1, 0)], 0)
    batch = {
        "inputs": inputs.astype(np.int32),
        "labels": labels[:, -s:].astype(np.int32),
        "mask": valid[:, -s:],
    }
    if self.target_weights is not None:
      label_pos = np.maximum(pos[:, -s:] + 1, 0)
      batch["weights"] = np.where(valid[:, -s:], self.target_weights[label_pos],
                                  0.0).astype(np.float32)
    return batch


class EpochShuffledBatches(grain.sources.RandomAccessDataSource):
  """Random-access source: step -> int64[B] example ids (-1 = padding)."""

  def __init__(self, num_examples: int, batch_size: int, num_epochs: float,
               seed: int):
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.total_examples = int(round(num_examples * num_epochs))
    self.num_steps = math.ceil(self.total_examples / batch_size)

  def __len__(self) -> int:
    return self.num_steps

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)

  def __getitem__(self, step: int) -> np.ndarray:
    if not 0 <= step < self.num_steps:
      raise IndexError(f"step {step} outside [0, {self.num_steps})")
    begin = step * self.batch_size
    flat = np.arange(begin, min(begin + self.batch_size, self.total_examples))
    epochs, within = np.divmod(flat, self.num_examples)
    out = np.full(self.batch_size, -1, np.int64)
    for ep in np.unique(epochs):
      sel = epochs == ep
      out[:len(flat)][sel] = self._permutation(int(ep))[within[sel]]
    return out


def train_dataset(items: np.ndarray, offsets: np.ndarray, *, max_len: int,
                  stride: int, windows_per_user: int, batch_size: int,
                  num_epochs: float, seed: int, process_index: int = 0,
                  process_count: int = 1, user_weight_power: float = 0.0
                  ) -> tuple[grain.MapDataset, dict]:
  """The training batches of this process, random access by global step.

  Each process collates only its rows `[p * B/P, (p + 1) * B/P)` of the global
  batch of size B. `user_weight_power > 0` adds per-target loss weights
  (`user_target_weights`). Returns the dataset and a dict of statistics.
  """
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} not divisible by "
                     f"{process_count} processes")
  ends, starts = window_ends(offsets, stride, windows_per_user)
  weights = (user_target_weights(offsets, user_weight_power)
             if user_weight_power else None)
  batcher = WindowBatcher(items.astype(np.int32), ends, starts, max_len,
                          stride, weights)
  source = EpochShuffledBatches(len(ends), batch_size, num_epochs, seed)
  local = batch_size // process_count
  lo = process_index * local
  ds = grain.MapDataset.source(source).map(
      lambda ids: batcher(ids[lo:lo + local]))
  num_targets = int(np.minimum(batcher.num_label_positions, ends - starts).sum())
  stats = {
      "num_windows": int(len(ends)),
      "num_targets_per_epoch": num_targets,
      "steps_per_epoch": len(ends) / batch_size,
      "num_steps": len(source),
      "padded_rows_in_last_batch": int(len(source) * batch_size
                                       - source.total_examples),
  }
  return ds, stats


def iterate_from(ds: grain.MapDataset, start_step: int, prefetch: int = 8):
  """Yields `(step, batch)` from `start_step` on, prefetched by grain threads."""
  it = ds[start_step:].to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
  for i, batch in enumerate(it):
    yield start_step + i, batch

"""Data containers shared by readers, preprocessing and the training pipeline.

`RawDataset` is what every reader returns: one row per interaction, in file
order, with raw (string) ids. `SequenceData` is the preprocessed form: one
chronological item sequence per user, internal ids, item texts and statistics,
plus the leave-one-out helpers the trainers and evaluators use.

Leave-one-out convention (per user sequence `seq`, length >= 3):
  train = seq[:-2], validation target = seq[-2], test target = seq[-1].
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, NamedTuple

import numpy as np

# Bumped whenever the saved layout or the preprocessing semantics change, so
# that stale caches are never reused.
FORMAT_VERSION = 2   # 2: non-finite ratings refused, below_k_core in the stats

PAD_ITEM = "<pad>"


class DataError(ValueError):
  """A data file is missing, malformed or inconsistent (message names it)."""


class ChecksumError(DataError):
  """A downloaded or extracted file does not have the expected digest."""


@dataclasses.dataclass
class RawDataset:
  """Interactions exactly as read from the source files.

  Attributes:
    name: dataset name, e.g. "ml-100k".
    users: object[N] raw user id (str) per interaction, in file order.
    items: object[N] raw item id (str) per interaction.
    ratings: float32[N] rating, nan where the source has none.
    timestamps: int64[N] unix seconds (or the source's integer clock).
    item_info: raw item id -> {"title": str, "year": str | None,
      "genres": list[str], ...}; only JSON-native values.
    user_info: raw user id -> source-specific fields (JSON-native values).
    source: human-readable file path(s), used in messages.
    notes: reader-side counts that preprocessing copies into the statistics
      (e.g. duplicate metadata lines); nothing is dropped without a count.
  """
  name: str
  users: np.ndarray
  items: np.ndarray
  ratings: np.ndarray
  timestamps: np.ndarray
  item_info: dict[str, dict]
  user_info: dict[str, dict]
  source: str
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n = len(self.users)
    for field in ("items", "ratings", "timestamps"):
      if len(getattr(self, field)) != n:
        raise DataError(
            f"{self.source}: {field} has {len(getattr(self, field))} rows, "
            f"users has {n}")

  @property
  def num_rows(self) -> int:
    return len(self.users)


class ItemSets(NamedTuple):
  """One item set per user in CSR form: user u's items are indices[indptr[u]:indptr[u + 1]].

  `recjax.metrics.sample_negatives(exclude=...)` takes it as is.
  """
  indices: np.ndarray  # int32[M]
  indptr: np.ndarray   # int64[U + 1]

  @property
  def max_len(self) -> int:
    """The largest set's size (at least 1)."""
    return max(int(np.max(np.diff(self.indptr), initial=0)), 1)

  def padded(self, start: int, stop: int, width: int | None = None) -> np.ndarray:
    """int32[stop - start, width]: users start..stop-1, right-padded with 0; width
    defaults to `max_len` (pass it when padding many slices: it scans every user)."""
    lengths = np.diff(self.indptr[start:stop + 1])
    out = np.zeros((stop - start, self.max_len if width is None else width), np.int32)
    rows = np.repeat(np.arange(stop - start), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = self.indices[self.indptr[start]:self.indptr[stop]]
    return out

  def mask(self, num_columns: int) -> np.ndarray:
    """bool[U, num_columns]: True at every item of each user's set."""
    num = len(self.indptr) - 1
    out = np.zeros((num, num_columns), bool)
    out[np.repeat(np.arange(num), np.diff(self.indptr)), self.indices] = True
    return out


@dataclasses.dataclass
class SequenceData:
  """One chronological item sequence per user, with internal ids.

  Attributes:
    name: dataset name.
    num_users: U.
    num_items: I; internal item ids are 1..I, 0 is padding.
    user_raw_ids: object[U] raw user id of internal user u (0-based).
    item_raw_ids: object[I + 1] raw item id of internal item i; [0] = "<pad>".
    item_titles: list[str] of length I + 1; [0] = ""; "" when unknown.
    item_info: list[dict] of length I + 1; extra text fields (year, genres,
      ...) for LLM prompts; [0] = {}.
    offsets: int64[U + 1]; user u's rows are [offsets[u], offsets[u + 1]).
    items: int32[N] internal item ids, per user in chronological order.
    timestamps: int64[N].
    ratings: float32[N] (nan where the source has none).
    stats: statistics of the preprocessing run (see preprocess.py).
    config: the preprocessing config used (a plain dict).
  """
  name: str
  num_users: int
  num_items: int
  user_raw_ids: np.ndarray
  item_raw_ids: np.ndarray
  item_titles: list[str]
  item_info: list[dict]
  offsets: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray
  ratings: np.ndarray
  stats: dict
  config: dict

  # ---------------------------------------------------------------- access --
  @property
  def num_interactions(self) -> int:
    return int(self.items.shape[0])

  def seq_lengths(self) -> np.ndarray:
    """int64[U] sequence length per user."""
    return np.diff(self.offsets)

  def sequence(self, u: int) -> np.ndarray:
    """int32[len_u] user u's items in chronological order."""
    return self.items[self.offsets[u]:self.offsets[u + 1]]

  def _prefix(self, drop_last: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's seq[:-drop_last], concatenated, and its offsets."""
    lengths = np.maximum(self.seq_lengths() - drop_last, 0)
    new_offsets = np.zeros_like(self.offsets)
    np.cumsum(lengths, out=new_offsets[1:])
    user_of_row = np.repeat(np.arange(self.num_users), self.seq_lengths())
    pos = np.arange(self.num_interactions) - self.offsets[user_of_row]
    keep = pos < lengths[user_of_row]
    return self.items[keep], new_offsets

  def train_sequences(self) -> tuple[np.ndarray, np.ndarray]:
    """Training part of leave-one-out: each user's seq[:-2].

    Returns:
      items: int32[N_train], offsets: int64[U + 1].
    """
    return self._prefix(2)

  def eval_examples(self, split: str, max_len: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One evaluation example per user.

    valid: history = seq[:-2][-max_len:], target = seq[-2].
    test:  history = seq[:-1][-max_len:] (includes the validation item),
           target = seq[-1].

    Returns:
      history: int32[U, max_len], LEFT-padded with 0 (most recent item last).
      target: int32[U].
      history_len: int32[U] number of real (non-pad) history items.
    """
    if split not in ("valid", "test"):
      raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    if np.any(self.seq_lengths() < 3):
      raise DataError(f"{self.name}: leave-one-out needs >= 3 items per user")
    end = self.offsets[1:] - (2 if split == "valid" else 1)   # target row
    start = np.maximum(self.offsets[:-1], end - max_len)
    idx = end[:, None] - max_len + np.arange(max_len)[None, :]
    real = idx >= start[:, None]
    history = np.where(real, self.items[np.clip(idx, 0, None)], 0)
    return (history.astype(np.int32), self.items[end].astype(np.int32),
            (end - start).astype(np.int32))

  def seen_items(self, split: str) -> ItemSets:
    """Every item each user interacted with before the split's target: seq[:-2] for
    "valid", seq[:-1] for "test" (`eval_examples` keeps only the last max_len of
    them as the model's input). The evaluators exclude these from the ranking."""
    if split not in ("valid", "test"):
      raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    items, offsets = self._prefix(2 if split == "valid" else 1)
    return ItemSets(items.astype(np.int32), offsets.astype(np.int64))

  def item_popularity(self, split: str = "train") -> np.ndarray:
    """int64[I + 1] interaction count per item id (index 0 = padding = 0).

    split: "train" counts seq[:-2] (what a model may see when validating),
      "train_valid" counts seq[:-1] (what it may see when testing),
      "all" counts every interaction.
    """
    drop = {"train": 2, "train_valid": 1, "all": 0}
    if split not in drop:
      raise ValueError(f"split must be one of {sorted(drop)}, got {split!r}")
    items, _ = self._prefix(drop[split])
    counts = np.bincount(items, minlength=self.num_items + 1).astype(np.int64)
    counts[0] = 0
    return counts

  # ------------------------------------------------------------ save / load --
  def save(self, directory: str) -> None:
    """Writes arrays.npz + meta.json + stats.json atomically into directory."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
      np.savez(
          os.path.join(tmp, "arrays.npz"),
          offsets=self.offsets.astype(np.int64),
          items=self.items.astype(np.int32),
          timestamps=self.timestamps.astype(np.int64),
          ratings=self.ratings.astype(np.float32),
          user_raw_ids=np.asarray(self.user_raw_ids, dtype=str),
          item_raw_ids=np.asarray(self.item_raw_ids, dtype=str))
      meta = {
          "format_version": FORMAT_VERSION,
          "name": self.name,
          "num_users": int(self.num_users),
          "num_items": int(self.num_items),
          "item_titles": list(self.item_titles),
          "item_info": list(self.item_info),
          "config": self.config,
          "stats": self.stats,
      }
      _write_json(os.path.join(tmp, "meta.json"), meta)
      _write_json(os.path.join(tmp, "stats.json"), self.stats)
      if os.path.exists(directory):
        shutil.rmtree(directory)
      os.replace(tmp, directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(cls, directory: str) -> "SequenceData":
    """Reads what `save` wrote; raises DataError if it is incomplete."""
    meta_path = os.path.join(directory, "meta.json")
    arrays_path = os.path.join(directory, "arrays.npz")
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
      with np.load(arrays_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"{directory}: cannot load saved dataset: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
      raise DataError(f"{meta_path}: format_version "
                      f"{meta.get('format_version')} != {FORMAT_VERSION}")
    return cls(
        name=meta["name"],
        num_users=meta["num_users"],
        num_items=meta["num_items"],
        user_raw_ids=arrays["user_raw_ids"].astype(object),
        item_raw_ids=arrays["item_raw_ids"].astype(object),
        item_titles=meta["item_titles"],
        item_info=meta["item_info"],
        offsets=arrays["offsets"],
        items=arrays["items"],
        timestamps=arrays["timestamps"],
        ratings=arrays["ratings"],
        stats=meta["stats"],
        config=meta["config"])


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=1, allow_nan=True)

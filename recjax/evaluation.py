"""Ranking evaluation: an explicit protocol and a batched, jitted evaluator.

Every number the evaluator returns is defined by a `Protocol` (split, full or
sampled candidates, history exclusion, tie rule, K values), printed with it by
`format_results`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from recjax import metrics as metrics_lib
from recjax.data.types import ItemSets

ScoreFn = Callable[[Any, jax.Array], jax.Array]

SPLITS = ("valid", "test")
CANDIDATES = ("full", "sampled")
SAMPLING = ("uniform", "popularity")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Protocol:
  """How ranking metrics are computed; printed with every result.

  Attributes:
    num_items: catalogue size N (item ids 1..N, 0 = padding).
    split: "valid" | "test".
    candidates: "full" (rank the target among all items) | "sampled" (rank it
      among `num_negatives` sampled negatives).
    num_negatives: negatives per user for "sampled" (default 100); ignored and
      stored as None for "full".
    sampling: "uniform" | "popularity" for "sampled" (default "uniform");
      ignored and stored as None for "full".
    exclude_history: remove the user's history items from the competitors (the
      target itself always stays); for "sampled" the negatives avoid them
      instead. Default False, as RecBole does for sequential models.
    ks: metric cut-offs, ascending.
    ties: "pessimistic" | "optimistic" | "average" (see recjax.metrics).
  """

  num_items: int
  split: str = "test"
  candidates: str = "full"
  num_negatives: int | None = None
  sampling: str | None = None
  exclude_history: bool = False
  ks: tuple[int, ...] = (5, 10, 20)
  ties: str = "pessimistic"

  def __post_init__(self):
    if self.num_items < 1:
      raise ValueError(f"num_items must be >= 1, got {self.num_items}")
    if self.split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
    if self.candidates not in CANDIDATES:
      raise ValueError(
          f"candidates must be one of {CANDIDATES}, got {self.candidates!r}")
    if self.candidates == "sampled":
      if self.num_negatives is None:
        object.__setattr__(self, "num_negatives", 100)
      if self.sampling is None:
        object.__setattr__(self, "sampling", "uniform")
      if self.sampling not in SAMPLING:
        raise ValueError(
            f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
      if not 1 <= self.num_negatives <= self.num_items - 1:
        raise ValueError(
            f"num_negatives must lie in [1, num_items - 1], "
            f"got {self.num_negatives}")
    else:  # not used by full ranking: stored as None so no header shows them
      object.__setattr__(self, "num_negatives", None)
      object.__setattr__(self, "sampling", None)
    ks = tuple(int(k) for k in self.ks)
    if not ks or any(k < 1 for k in ks) or list(ks) != sorted(set(ks)):
      raise ValueError(f"ks must be distinct positive ascending ints, got {ks}")
    object.__setattr__(self, "ks", ks)
    metrics_lib._check_ties(self.ties)  # pylint: disable=protected-access

  @classmethod
  def from_ranking(cls, ranking: str, **kwargs) -> "Protocol":
    """Builds a protocol from "full" or "sampled-<sampling>-<num_negatives>"."""
    if ranking == "full":
      return cls(candidates="full", **kwargs)
    parts = ranking.split("-")
    if len(parts) != 3 or parts[0] != "sampled" or not parts[2].isdigit():
      raise ValueError(
          f"ranking must be 'full' or 'sampled-<uniform|popularity>-<n>', "
          f"got {ranking!r}")
    return cls(candidates="sampled", sampling=parts[1],
               num_negatives=int(parts[2]), **kwargs)

  @property
  def ranking(self) -> str:
    """"full" or e.g. "sampled-uniform-100"."""
    if self.candidates == "full":
      return "full"
    return f"sampled-{self.sampling}-{self.num_negatives}"

  def __str__(self) -> str:
    if self.candidates == "full":
      ranking = f"full ranking over {self.num_items} items"
    else:
      ranking = (f"sampled ranking: target vs {self.num_negatives} "
                 f"{self.sampling} negatives (of {self.num_items} items)")
    history = ("history excluded" if self.exclude_history
               else "history not excluded")
    ks = ",".join(str(k) for k in self.ks)
    return (f"{self.split} | {ranking} | {history} | ties {self.ties} | "
            f"HR/NDCG/MRR@{ks}")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["ks"] = list(self.ks)
    d["ranking"] = self.ranking
    return d


def history_mask(histories: jax.Array, num_columns: int) -> jax.Array:
  """bool[B, V]: True at every item id in the row's history (0 included).

  Args:
    histories: int32[B, L] item ids, 0 = padding.
    num_columns: V = num_items + 1.
  """
  rows = jnp.arange(histories.shape[0])[:, None]
  mask = jnp.zeros((histories.shape[0], num_columns), bool)
  return mask.at[rows, histories].set(True)


class RankingEvaluator:
  """Batched HR/NDCG/MRR@K under a `Protocol`.

  One jitted function evaluates a fixed-size batch; the last batch is padded
  and masked, so every batch reuses the same compiled program.

  Attributes:
    protocol: the Protocol every result is computed under.
    batch_size: rows per jitted call.
    num_traces: how often the batch function has been traced (1 after any
      number of `run` calls with unchanged shapes and dtypes).
  """

  def __init__(
      self,
      score_fn: ScoreFn,
      protocol: Protocol,
      batch_size: int,
      *,
      batch_sharding: jax.sharding.NamedSharding | None = None,
      nan_policy: str = "raise",
  ):
    """Builds the evaluator; nothing is compiled until the first `run`.

    Args:
      score_fn: pure `score_fn(params, histories int32[B, L])` returning
        float32[B, N + 1] scores (column 0 = padding).
      protocol: the evaluation protocol.
      batch_size: rows per batch (the last batch is padded to it).
      batch_sharding: if given, each batch is `jax.device_put` with this
        sharding's mesh and its first PartitionSpec entry on the batch axis;
        batch_size must be divisible by the number of data shards.
      nan_policy: "raise" (FloatingPointError if any real row's ranking
        touches a NaN score) or "count" (NaN ranks as -inf; such rows are
        reported in results["num_nan_rows"]).
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if nan_policy not in ("raise", "count"):
      raise ValueError(f"nan_policy must be 'raise' or 'count', got "
                       f"{nan_policy!r}")
    self.score_fn = score_fn
    self.protocol = protocol
    self.batch_size = batch_size
    self.nan_policy = nan_policy
    self.batch_sharding = batch_sharding
    if batch_sharding is not None:
      spec = batch_sharding.spec
      axes = spec[0] if len(spec) else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      shards = int(np.prod([batch_sharding.mesh.shape[a] for a in axes]))
      if batch_size % shards:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {shards} data "
            f"shards of batch_sharding (mesh axes {tuple(axes)})")
      self._batch_axes = spec[0] if len(spec) else None
    self.num_traces = 0
    # Outputs replicated on the mesh: every process can read all rows.
    out_shardings = (None if batch_sharding is None else
                     jax.sharding.NamedSharding(batch_sharding.mesh,
                                                jax.sharding.PartitionSpec()))
    self._batch_fn = jax.jit(self._eval_batch, out_shardings=out_shardings)

  def _eval_batch(self, params, histories, targets, negatives, valid, seen):
    """Masked per-example metric values of one padded batch.

    Args:
      params: score_fn parameters.
      histories: int32[B, L].
      targets: int32[B].
      negatives: int32[B, M] for the sampled protocol, else None.
      valid: bool[B], False on padding rows.
      seen: int32[B, E] items excluded from full ranking (0 = padding), or None to
        exclude `histories` (when the protocol excludes the history at all).

    Returns:
      {"hr@k" | ... | "count" | "num_nan_rows": float32[B]}, per-example values
      that are 0 on padding rows. They (and the metrics' squares, for the
      standard errors) are summed on the host in float64, so results do not
      depend on batch size or sharding (no float32 reduction whose order could
      change).
    """
    self.num_traces += 1
    p = self.protocol
    scores = self.score_fn(params, histories)
    if scores.shape[-1] != p.num_items + 1:
      raise ValueError(
          f"score_fn returned {scores.shape[-1]} columns, expected "
          f"num_items + 1 = {p.num_items + 1}")
    scores = scores.astype(jnp.float32)
    if p.candidates == "full":
      exclude = (history_mask(histories if seen is None else seen, scores.shape[-1])
                 if p.exclude_history else None)
      ranks = metrics_lib.target_ranks(scores, targets, exclude, ties=p.ties)
      nan = metrics_lib.nan_rows(scores, targets, exclude)
    else:
      ranks = metrics_lib.candidate_ranks(
          scores, targets, negatives, ties=p.ties)
      nan = metrics_lib.candidate_nan_rows(scores, targets, negatives)
    values = {
        name: jnp.where(valid, v, 0.0)
        for name, v in metrics_lib.per_example_metrics(ranks, p.ks).items()
    }
    values[metrics_lib.COUNT_KEY] = valid.astype(jnp.float32)
    values["num_nan_rows"] = (nan & valid).astype(jnp.float32)
    return values

  def sample_negatives(
      self,
      histories: np.ndarray,
      targets: np.ndarray,
      seed: int = 0,
      popularity: np.ndarray | None = None,
      seen: ItemSets | None = None,
  ) -> np.ndarray:
    """int32[U, num_negatives] for the sampled protocol, from `seed` alone.

    Drawn for all users at once, so they do not depend on batch_size. With
    `exclude_history`, they avoid `seen` (or, without it, `histories`).
    """
    p = self.protocol
    if p.sampling == "popularity" and popularity is None:
      raise ValueError("sampling='popularity' needs run(..., popularity=...)")
    return metrics_lib.sample_negatives(
        np.random.default_rng(seed), p.num_items, targets,
        num_negatives=p.num_negatives, strategy=p.sampling,
        popularity=popularity,
        exclude=((np.asarray(histories) if seen is None else seen)
                 if p.exclude_history else None))

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.batch_sharding is None:
      return jnp.asarray(x)
    spec = jax.sharding.PartitionSpec(self._batch_axes, *[None] * (x.ndim - 1))
    return jax.device_put(
        x, jax.sharding.NamedSharding(self.batch_sharding.mesh, spec))

  def run(
      self,
      params: Any,
      histories: np.ndarray,
      targets: np.ndarray,
      seed: int = 0,
      popularity: np.ndarray | None = None,
      seen: ItemSets | None = None,
  ) -> dict[str, float]:
    """Evaluates every user once.

    Args:
      params: score_fn parameters (may be sharded on a mesh).
      histories: int32[U, L] item ids, 0 = padding (the model's input).
      targets: int32[U] held-out item ids in [1, num_items].
      seed: seed of the sampled negatives (unused for full ranking).
      popularity: int64[N + 1] item counts for sampling="popularity".
      seen: every item each user interacted with before the target
        (`SequenceData.seen_items(split)`), excluded under `exclude_history`.
        None excludes `histories` only, which misses the items of a history
        longer than the model's window.

    Returns:
      {"hr@k", "ndcg@k", "mrr@k" (means), "hr@k_se", ... (standard errors of
      those means over the users; absent for a single user), "num_examples",
      "num_nan_rows"}.
    """
    p = self.protocol
    histories = np.asarray(histories, np.int32)
    targets = np.asarray(targets, np.int32)
    num = targets.shape[0]
    if histories.ndim != 2 or histories.shape[0] != num:
      raise ValueError(f"histories must be int32[U={num}, L], got "
                       f"{histories.shape}")
    if num == 0:
      raise ValueError("no users to evaluate")
    if np.any((targets < 1) | (targets > p.num_items)):
      raise ValueError(f"targets must lie in [1, {p.num_items}]")
    if np.any((histories < 0) | (histories > p.num_items)):
      raise ValueError(f"history ids must lie in [0, {p.num_items}]")
    if seen is not None:
      if len(seen.indptr) != num + 1:
        raise ValueError(f"seen has {len(seen.indptr) - 1} users, targets {num}")
      if seen.indices.size and (seen.indices.min() < 0 or seen.indices.max() > p.num_items):
        raise ValueError(f"seen item ids must lie in [0, {p.num_items}]")
    negatives = None
    if p.candidates == "sampled":
      negatives = self.sample_negatives(histories, targets, seed, popularity, seen)
    # Full ranking excluding `seen`: its rows, padded to the longest, go with each batch.
    pass_seen = seen is not None and p.exclude_history and p.candidates == "full"
    width = seen.max_len if pass_seen else 0   # one width: one compiled batch function

    bs = self.batch_size
    outputs = []  # fetched after the loop, so batches dispatch asynchronously
    for start in range(0, num, bs):
      stop = min(start + bs, num)
      pad = bs - (stop - start)
      valid = np.arange(bs) < stop - start

      def batch(x, start=start, stop=stop, pad=pad):
        return self._put(np.pad(x[start:stop], [(0, pad)] + [(0, 0)] *
                                (x.ndim - 1)))

      outputs.append(self._batch_fn(
          params, batch(histories), batch(targets),
          None if negatives is None else batch(negatives), self._put(valid),
          self._put(np.pad(seen.padded(start, stop, width), [(0, pad), (0, 0)]))
          if pass_seen else None))
    total = {}
    for values in jax.device_get(outputs):
      for name, value in values.items():
        total[name] = total.get(name, 0.0) + np.sum(value, dtype=np.float64)
        if "@" in name:        # a metric: its sum of squares gives the standard error
          sq = name + metrics_lib.SQUARES_SUFFIX
          total[sq] = total.get(sq, 0.0) + np.sum(np.square(value, dtype=np.float64))

    num_nan = int(total.pop("num_nan_rows"))
    if num_nan and self.nan_policy == "raise":
      raise FloatingPointError(
          f"{num_nan} of {num} rows have NaN scores among the ranked items "
          f"({p}); pass nan_policy='count' to rank NaN as -inf instead")
    count = int(total[metrics_lib.COUNT_KEY])
    assert count == num, (count, num)
    results = metrics_lib.finalize(total)
    results["num_examples"] = count
    results["num_nan_rows"] = num_nan
    return results


def format_results(results: dict[str, float], protocol: Protocol) -> str:
  """A small table headed by the protocol line.

  Each cell is the mean over users, followed by `+- standard error` when the
  results carry one (`<metric>_se`, see `metrics.finalize`).
  """
  se = metrics_lib.SE_SUFFIX
  with_se = all(f"{m}@{k}{se}" in results
                for k in protocol.ks for m in metrics_lib.METRICS)
  width = 16 if with_se else 7

  def cell(name):
    text = f"{results[name]:.4f}"
    if with_se:
      text += f" +- {results[name + se]:.4f}"
    return f"{text:>{width}}"

  lines = [str(protocol),
           f"{'K':>4}  {'HR':>{width}}  {'NDCG':>{width}}  {'MRR':>{width}}"]
  for k in protocol.ks:
    lines.append(f"{k:>4}  {cell(f'hr@{k}')}  {cell(f'ndcg@{k}')}  "
                 f"{cell(f'mrr@{k}')}")
  footer = f"users: {results.get('num_examples', '?')}"
  if with_se:
    footer += " | +- = standard error of the mean over users"
  if results.get("num_nan_rows"):
    footer += f" | WARNING: {results['num_nan_rows']} rows had NaN scores"
  lines.append(footer)
  return "\n".join(lines)

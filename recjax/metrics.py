"""Ranking metrics: target ranks, HR/NDCG/MRR@K sums, sampled negatives.

Conventions shared by every function here:

* Item ids run from 1 to `num_items`; id 0 is padding. Score matrices have one
  column per id, `float32[B, V]` with `V = num_items + 1`, and column 0 is never
  ranked.
* A rank is 1-based: rank 1 means no rankable item is placed above the target.
* Ties (an item whose score equals the target's) are resolved by `ties`:
  - "pessimistic" (default): tied items count as ranked above the target, so a
    constant scorer gets the worst possible rank, never a flattering one.
  - "optimistic": tied items count as ranked below the target.
  - "average": the mid-rank, `1 + above + equal / 2` (float32). Metrics are then
    evaluated at that fractional rank; this is not the expectation of the metric
    over random tie-breaking.
* Non-finite scores: -inf ranks lowest, +inf highest. NaN is mapped to -inf for
  ranking (so a NaN item never outranks anything), and `nan_rows` /
  `candidate_nan_rows` flag every row in which a NaN touched the ranking, so
  callers can count or refuse them (the evaluator refuses them by default).

The jittable functions take `ties` and `ks` as Python values: mark them static
(`jax.jit(target_ranks, static_argnames="ties")`) when jitting them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TIES = ("pessimistic", "optimistic", "average")
METRICS = ("hr", "ndcg", "mrr")
COUNT_KEY = "count"
SQUARES_SUFFIX = "_sq"    # accumulated sum of squares of a metric (see `finalize`)
SE_SUFFIX = "_se"         # standard error of a metric's mean over examples


def _check_ties(ties: str) -> None:
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def _nan_to_neg_inf(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.isnan(x), -jnp.inf, x)


def rank_against(
    target_score: jax.Array,
    other_scores: jax.Array,
    other_mask: jax.Array,
    ties: str = "pessimistic",
) -> jax.Array:
  """1-based rank of a target score among the masked other scores.

  Args:
    target_score: float32[B], the target's score.
    other_scores: float32[B, M], scores of the competing items.
    other_mask: bool[B, M], True where the competitor takes part in the ranking.
    ties: "pessimistic" | "optimistic" | "average" (see the module docstring).

  Returns:
    int32[B] ranks, or float32[B] for ties="average".
  """
  _check_ties(ties)
  target_score = _nan_to_neg_inf(target_score)[:, None]
  other_scores = _nan_to_neg_inf(other_scores)
  above = jnp.sum(other_mask & (other_scores > target_score), axis=-1)
  equal = jnp.sum(other_mask & (other_scores == target_score), axis=-1)
  above = above.astype(jnp.int32)
  equal = equal.astype(jnp.int32)
  if ties == "pessimistic":
    return 1 + above + equal
  if ties == "optimistic":
    return 1 + above
  return 1.0 + above.astype(jnp.float32) + 0.5 * equal.astype(jnp.float32)


def rankable_mask(
    targets: jax.Array, num_columns: int, exclude: jax.Array | None = None
) -> jax.Array:
  """Items that compete with the target in full ranking.

  Args:
    targets: int32[B] target ids.
    num_columns: V, the number of score columns (num_items + 1).
    exclude: bool[B, V] or None, items to leave out (e.g. the user's history).

  Returns:
    bool[B, V]: not padding (id 0), not excluded, not the target itself.
  """
  ids = jnp.arange(num_columns, dtype=jnp.int32)[None, :]
  mask = (ids != 0) & (ids != targets[:, None])
  if exclude is not None:
    mask = mask & ~exclude
  return mask


def target_ranks(
    scores: jax.Array,
    targets: jax.Array,
    exclude: jax.Array | None = None,
    *,
    ties: str = "pessimistic",
) -> jax.Array:
  """Full-ranking 1-based rank of each target among the non-excluded items.

  Item 0 (padding) is never ranked. The target itself is never excluded, even
  when `exclude` marks it (e.g. an item repeated from the user's history): the
  question asked is always "where does the held-out item land", and leaving it
  out would make the rank undefined. Other excluded items are simply removed
  from the competition.

  Args:
    scores: float32[B, V] scores for every item id (column 0 = padding).
    targets: int32[B] target ids in [1, V).
    exclude: bool[B, V] or None, items removed from the ranking.
    ties: "pessimistic" (default) | "optimistic" | "average".

  Returns:
    int32[B] ranks in [1, V - 1], or float32[B] for ties="average".
  """
  targets = targets.astype(jnp.int32)
  target_score = jnp.take_along_axis(scores, targets[:, None], axis=-1)[:, 0]
  mask = rankable_mask(targets, scores.shape[-1], exclude)
  return rank_against(target_score, scores, mask, ties)


def nan_rows(
    scores: jax.Array, targets: jax.Array, exclude: jax.Array | None = None
) -> jax.Array:
  """bool[B]: True where the target or a rankable item has a NaN score."""
  targets = targets.astype(jnp.int32)
  nan = jnp.isnan(scores)
  target_nan = jnp.take_along_axis(nan, targets[:, None], axis=-1)[:, 0]
  mask = rankable_mask(targets, scores.shape[-1], exclude)
  return target_nan | jnp.any(nan & mask, axis=-1)


def candidate_scores(
    scores: jax.Array, targets: jax.Array, negatives: jax.Array
) -> jax.Array:
  """float32[B, 1 + M]: the target's score in column 0, then the negatives'.

  Args:
    scores: float32[B, V] scores for every item id.
    targets: int32[B] target ids.
    negatives: int32[B, M] sampled negative ids (0 = padding, ignored later).
  """
  ids = jnp.concatenate(
      [targets[:, None].astype(jnp.int32), negatives.astype(jnp.int32)], axis=1)
  return jnp.take_along_axis(scores, ids, axis=-1)


def _negative_mask(targets: jax.Array, negatives: jax.Array) -> jax.Array:
  return (negatives != 0) & (negatives != targets[:, None])


def candidate_ranks(
    scores: jax.Array,
    targets: jax.Array,
    negatives: jax.Array,
    *,
    ties: str = "pessimistic",
) -> jax.Array:
  """Sampled-protocol rank of each target among its own negatives.

  Rank 1 means the target beats all of its negatives; the worst rank is M + 1.
  Negative ids equal to 0 (padding) or to the target are ignored; duplicate
  negatives would count twice (`sample_negatives` never produces them).

  Args:
    scores: float32[B, V] scores for every item id.
    targets: int32[B] target ids.
    negatives: int32[B, M] negative ids per row.
    ties: "pessimistic" (default) | "optimistic" | "average".

  Returns:
    int32[B] ranks in [1, M + 1], or float32[B] for ties="average".
  """
  cand = candidate_scores(scores, targets, negatives)
  return rank_against(
      cand[:, 0], cand[:, 1:], _negative_mask(targets, negatives), ties)


def candidate_nan_rows(
    scores: jax.Array, targets: jax.Array, negatives: jax.Array
) -> jax.Array:
  """bool[B]: True where the target or one of its negatives has a NaN score."""
  nan = jnp.isnan(candidate_scores(scores, targets, negatives))
  neg_nan = nan[:, 1:] & _negative_mask(targets, negatives)
  return nan[:, 0] | jnp.any(neg_nan, axis=-1)


def metric_names(ks: Sequence[int]) -> list[str]:
  """Result keys in display order: hr@k, ndcg@k, mrr@k for every k."""
  return [f"{m}@{k}" for k in ks for m in METRICS]


def per_example_metrics(
    ranks: jax.Array, ks: Sequence[int] = (5, 10, 20)
) -> dict[str, jax.Array]:
  """HR, NDCG and MRR at every K for each example.

  With one held-out target, HR@K equals Recall@K: 1 if rank <= K.
  NDCG@K = 1 / log2(rank + 1) if rank <= K (the ideal DCG is 1), MRR@K =
  1 / rank if rank <= K; both are 0 otherwise.

  Args:
    ranks: int32[B] or float32[B] 1-based ranks.
    ks: cut-offs.

  Returns:
    {"hr@k" | "ndcg@k" | "mrr@k": float32[B]}.
  """
  r = jnp.asarray(ranks).astype(jnp.float32)
  out = {}
  for k in ks:
    hit = r <= k
    out[f"hr@{k}"] = hit.astype(jnp.float32)
    out[f"ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(r + 1.0), 0.0)
    out[f"mrr@{k}"] = jnp.where(hit, 1.0 / r, 0.0)
  return out


def ranking_metrics(
    ranks: jax.Array,
    ks: Sequence[int] = (5, 10, 20),
    mask: jax.Array | None = None,
    with_squares: bool = False,
) -> dict[str, jax.Array]:
  """Masked metric sums and the example count of one batch.

  Sums (not means) so that batches accumulate exactly; divide with `finalize`.

  Args:
    ranks: int32[B] or float32[B] 1-based ranks.
    ks: cut-offs.
    mask: bool[B] or None; False rows (e.g. padding of the last batch) count
      for nothing.
    with_squares: also return each metric's sum of squares (key + "_sq"), from
      which `finalize` derives the standard error of the mean.

  Returns:
    {"hr@k" | "ndcg@k" | "mrr@k" [| "<metric>_sq"]: float32[], "count": float32[]}.
  """
  per_example = per_example_metrics(ranks, ks)
  if mask is None:
    mask = jnp.ones(jnp.shape(ranks), bool)
  mask = jnp.asarray(mask, bool)
  # `where`, not a product: a padding row may hold any rank (even 0 -> inf).
  sums = {name: jnp.sum(jnp.where(mask, v, 0.0))
          for name, v in per_example.items()}
  if with_squares:
    sums.update({name + SQUARES_SUFFIX: jnp.sum(jnp.where(mask, v * v, 0.0))
                 for name, v in per_example.items()})
  sums[COUNT_KEY] = jnp.sum(mask.astype(jnp.float32))
  return sums


def finalize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Divides accumulated sums by their count: {"hr@k": mean, ...}.

  A sum of squares `"<metric>_sq"` (see `ranking_metrics(with_squares=True)`)
  becomes `"<metric>_se"`, the standard error of that mean over the examples,
  sqrt(s^2 / n) with the sample variance s^2 (n - 1 in its denominator); it is
  left out when there is a single example.

  Raises:
    ValueError: if the count is zero (no examples were evaluated).
  """
  count = float(sums[COUNT_KEY])
  if count <= 0:
    raise ValueError("no examples to average (count is 0)")
  out = {}
  for name, value in sums.items():
    if name == COUNT_KEY or name.endswith(SQUARES_SUFFIX):
      continue
    out[name] = float(value) / count
  for name, value in sums.items():
    if not name.endswith(SQUARES_SUFFIX) or count < 2:
      continue
    base = name[:-len(SQUARES_SUFFIX)]
    if base not in out:
      raise ValueError(f"{name!r} has no matching sum {base!r}")
    mean = out[base]
    variance = max(float(value) / count - mean * mean, 0.0) * count / (count - 1)
    out[base + SE_SUFFIX] = math.sqrt(variance / count)
  return out


# ----------------------------------------------------------------------------
# Sampled negatives (host-side NumPy).


def _exclusion_rows(exclude: Any, num_rows: int) -> list[np.ndarray] | None:
  """Normalises `exclude` to one int64 array of item ids per row."""
  if exclude is None:
    return None
  if hasattr(exclude, "indptr") and hasattr(exclude, "indices"):
    indptr = np.asarray(exclude.indptr)
    indices = np.asarray(exclude.indices)
    rows = [indices[indptr[i]:indptr[i + 1]] for i in range(len(indptr) - 1)]
  elif isinstance(exclude, np.ndarray) and exclude.ndim == 2:
    rows = list(exclude)  # padded histories int32[B, L]; 0 is banned anyway
  else:
    rows = [np.fromiter(r, np.int64) if not isinstance(r, np.ndarray) else r
            for r in exclude]
  if len(rows) != num_rows:
    raise ValueError(
        f"exclude has {len(rows)} rows but there are {num_rows} targets")
  return [np.asarray(r, np.int64).ravel() for r in rows]


def _popularity_cdf(popularity: Any, num_items: int) -> np.ndarray:
  p = np.asarray(popularity, np.float64)
  if p.shape != (num_items + 1,):
    raise ValueError(
        f"popularity must have shape [num_items + 1] = [{num_items + 1}] "
        f"(index 0 = padding), got {p.shape}")
  if not np.all(np.isfinite(p)) or np.any(p < 0):
    raise ValueError("popularity must be finite and non-negative")
  p = p.copy()
  p[0] = 0.0
  if p.sum() <= 0:
    raise ValueError("popularity is zero for every item")
  return np.cumsum(p)


def sample_negatives(
    rng: np.random.Generator,
    num_items: int,
    targets: np.ndarray,
    num_negatives: int = 100,
    strategy: str = "uniform",
    popularity: np.ndarray | None = None,
    exclude: Any = None,
) -> np.ndarray:
  """Samples negative items per row, on the host, deterministically.

  Each row gets `num_negatives` distinct ids in [1, num_items], none equal to
  the row's target and none in the row's excluded set. Sampling is successive
  draws without replacement, each draw proportional to the weight of the
  remaining allowed items: uniform weights, or `popularity` (items with zero
  popularity are never drawn). Results depend only on `rng`'s state and the
  arguments.

  Args:
    rng: NumPy generator, e.g. `np.random.default_rng(seed)`.
    num_items: catalogue size N (ids 1..N).
    targets: int[B] target ids in [1, N].
    num_negatives: negatives per row.
    strategy: "uniform" | "popularity".
    popularity: int64[N + 1] counts (index 0 ignored); needed for "popularity".
    exclude: per-row item sets to avoid, or None. One of: a sequence of
      iterables of ids; an object with `indptr` and `indices` (CSR, e.g. a
      scipy.sparse csr matrix, row i = indices[indptr[i]:indptr[i+1]]); or a
      2-D int array of padded rows (0 ignored), e.g. histories int32[B, L].

  Returns:
    int32[B, num_negatives].

  Raises:
    ValueError: on a bad argument, or when a row has fewer than
      `num_negatives` allowed items.
  """
  targets = np.asarray(targets, np.int64).ravel()
  num_rows = targets.shape[0]
  if num_negatives < 0:
    raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
  if np.any((targets < 1) | (targets > num_items)):
    raise ValueError(f"targets must lie in [1, {num_items}]")
  if strategy == "uniform":
    cdf = weight = num_zero = None
  elif strategy == "popularity":
    if popularity is None:
      raise ValueError('strategy="popularity" needs a popularity array')
    cdf = _popularity_cdf(popularity, num_items)
    weight = np.diff(cdf, prepend=0.0)
    num_zero = int(np.count_nonzero(weight[1:] == 0))
  else:
    raise ValueError(f'strategy must be "uniform" or "popularity", got '
                     f"{strategy!r}")
  excluded = _exclusion_rows(exclude, num_rows)
  out = np.zeros((num_rows, num_negatives), np.int32)
  if num_negatives == 0:
    return out

  def draw(size: int) -> np.ndarray:
    if cdf is None:
      return rng.integers(1, num_items + 1, size=size)
    u = rng.random(size) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), num_items)

  for i in range(num_rows):
    banned = np.array([0, targets[i]], np.int64)
    if excluded is not None:
      banned = np.union1d(banned, excluded[i])
    out[i] = _sample_row(rng, draw, num_items, num_negatives, banned, weight,
                         num_zero, i)
  return out


def _sample_row(rng, draw, num_items, num_negatives, banned, weight, num_zero,
                row):
  """Successive draws without replacement avoiding `banned` (sorted, unique).

  `weight` is float64[N + 1] (weight[0] = 0), or None for uniform sampling;
  `num_zero` counts the items 1..N of zero weight.
  """
  banned = banned[(banned >= 0) & (banned <= num_items)]
  num_allowed = num_items + 1 - banned.size  # banned holds 0
  if weight is not None:  # zero-weight items that are not banned are out too
    num_allowed -= num_zero - (int(np.count_nonzero(weight[banned] == 0)) - 1)
  if num_allowed < num_negatives:
    raise ValueError(
        f"row {row}: only {num_allowed} items can be sampled as negatives, "
        f"{num_negatives} requested")
  chosen: list[int] = []
  seen = set(banned.tolist())
  # Rejection keeps the exact successive-draw distribution; when the allowed
  # set is a small part of the mass, fall back to an explicit choice below.
  for _ in range(8):
    for item in draw(2 * (num_negatives - len(chosen)) + 8).tolist():
      if item not in seen:
        seen.add(item)
        chosen.append(item)
        if len(chosen) == num_negatives:
          return np.asarray(chosen, np.int32)
  allowed = np.setdiff1d(np.arange(1, num_items + 1),
                         np.fromiter(seen, np.int64))
  need = num_negatives - len(chosen)
  if weight is None:
    p = None
  else:
    w = weight[allowed]
    allowed, w = allowed[w > 0], w[w > 0]
    p = w / w.sum()
  rest = rng.choice(allowed, size=need, replace=False, p=p)
  return np.asarray(chosen + rest.tolist(), np.int32)

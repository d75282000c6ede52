"""Tests for recjax.metrics against brute-force NumPy / Python references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax import metrics

KS = (1, 3, 5, 10)
TIES = ("pessimistic", "optimistic", "average")

# Jitted once here: eager calls would compile every primitive separately.
target_ranks = jax.jit(metrics.target_ranks, static_argnames="ties")
candidate_ranks = jax.jit(metrics.candidate_ranks, static_argnames="ties")
nan_rows = jax.jit(metrics.nan_rows)
candidate_nan_rows = jax.jit(metrics.candidate_nan_rows)
ranking_metrics = jax.jit(metrics.ranking_metrics, static_argnames="ks")


# ----------------------------------------------------------------------------
# References: sort the competitors as a Python list, read off the target.


def ref_rank(scores, target, excluded=(), ties="pessimistic", candidates=None):
  """Rank of `target` by sorting (score, tie-break) tuples in a Python list.

  candidates: the ids that compete (default: every id except 0 and `excluded`;
  the target always competes).
  """
  s = [(-math.inf if math.isnan(x) else float(x)) for x in scores]
  if candidates is None:
    candidates = [j for j in range(1, len(s)) if j not in set(excluded)]
  candidates = sorted(set(candidates) | {target})
  ranks = {}
  for mode, target_key in (("pessimistic", 1), ("optimistic", 0)):
    # Descending score; among equal scores the target goes last (pessimistic)
    # or first (optimistic).
    order = sorted(candidates, key=lambda j, tk=target_key: (
        -s[j], tk if j == target else 1 - tk))
    ranks[mode] = order.index(target) + 1
  if ties == "average":
    return (ranks["pessimistic"] + ranks["optimistic"]) / 2
  return ranks[ties]


def ref_metrics(ranks, ks):
  out = {}
  for k in ks:
    out[f"hr@{k}"] = [1.0 if r <= k else 0.0 for r in ranks]
    out[f"ndcg@{k}"] = [1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]
    out[f"mrr@{k}"] = [1 / r if r <= k else 0.0 for r in ranks]
  return out


def tied_scores(rng, batch, num_columns, levels=4):
  """Scores from a few discrete values, so ties are frequent."""
  return rng.integers(0, levels, size=(batch, num_columns)).astype(np.float32)


# ----------------------------------------------------------------------------
# target_ranks


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("with_exclude", [False, True])
def test_target_ranks_matches_reference(ties, with_exclude):
  rng = np.random.default_rng(0)
  b, v = 64, 23
  scores = tied_scores(rng, b, v)
  scores[:, 0] = 100.0  # padding column scores highest: must never count
  targets = rng.integers(1, v, size=b).astype(np.int32)
  exclude = rng.random((b, v)) < 0.3 if with_exclude else None
  if with_exclude:
    exclude[: b // 2, :][np.arange(b // 2), targets[: b // 2]] = True  # target

  got = np.asarray(target_ranks(scores, targets, exclude, ties=ties))

  want = [
      ref_rank(scores[i], targets[i],
               np.flatnonzero(exclude[i]) if with_exclude else (), ties)
      for i in range(b)
  ]
  assert got.dtype == (np.float32 if ties == "average" else np.int32)
  np.testing.assert_array_equal(got, np.asarray(want, got.dtype))
  # Ties are frequent in this data, so the three modes really differ.
  if ties == "pessimistic":
    opt = target_ranks(scores, targets, exclude, ties="optimistic")
    assert np.sum(np.asarray(opt) < got) > b // 2


def test_constant_scorer_gets_worst_rank_when_pessimistic():
  b, v = 3, 11
  scores = np.zeros((b, v), np.float32)
  targets = np.array([1, 5, 10], np.int32)
  pes = target_ranks(scores, targets)
  opt = target_ranks(scores, targets, ties="optimistic")
  avg = target_ranks(scores, targets, ties="average")
  np.testing.assert_array_equal(pes, [10, 10, 10])  # worst of 10 real items
  np.testing.assert_array_equal(opt, [1, 1, 1])
  np.testing.assert_array_equal(avg, [5.5, 5.5, 5.5])
  sums = ranking_metrics(pes, ks=(5,))
  assert float(sums["hr@5"]) == 0.0


def test_target_is_never_excluded():
  scores = np.array([[0.0, 5.0, 4.0, 3.0, 2.0]], np.float32)
  targets = np.array([3], np.int32)
  exclude = np.array([[False, True, False, True, False]])  # 1 and the target
  # Item 1 is excluded, item 2 beats the target, target stays rankable.
  np.testing.assert_array_equal(
      target_ranks(scores, targets, exclude), [2])
  np.testing.assert_array_equal(target_ranks(scores, targets), [3])


def test_nan_and_inf_scores():
  nan, inf = np.nan, np.inf
  scores = np.array([
      [0, 1.0, nan, 0.5, -inf],   # NaN competitor: ranks as -inf (below all)
      [0, 1.0, nan, 0.5, -inf],   # NaN target: ties with -inf, worst rank
      [0, inf, 2.0, 0.5, -inf],   # +inf above, -inf below
      [nan, 1.0, 2.0, 0.5, 0.0],  # NaN in padding column: not a NaN row
  ], np.float32)
  targets = np.array([3, 2, 2, 1], np.int32)
  ranks = target_ranks(scores, targets)
  np.testing.assert_array_equal(ranks, [2, 4, 2, 2])
  for i in range(4):
    assert ranks[i] == ref_rank(scores[i], targets[i])
  np.testing.assert_array_equal(
      nan_rows(scores, targets), [True, True, False, False])
  # A NaN that is excluded from the ranking does not flag the row.
  exclude = np.zeros_like(scores, bool)
  exclude[0, 2] = True
  assert not nan_rows(scores, targets, exclude)[0]


# ----------------------------------------------------------------------------
# ranking_metrics


@pytest.mark.parametrize("ties", TIES)
def test_ranking_metrics_matches_reference(ties):
  rng = np.random.default_rng(1)
  b, v = 50, 30
  scores = tied_scores(rng, b, v, levels=6)
  targets = rng.integers(1, v, size=b).astype(np.int32)
  mask = rng.random(b) < 0.8
  ranks = target_ranks(scores, targets, ties=ties)

  sums = jax.device_get(ranking_metrics(ranks, ks=KS, mask=mask))

  ref_ranks = [ref_rank(scores[i], targets[i], ties=ties) for i in range(b)]
  ref = ref_metrics(ref_ranks, KS)
  assert float(sums["count"]) == mask.sum()
  assert set(sums) == set(metrics.metric_names(KS)) | {"count"}
  means = metrics.finalize(sums)
  for name, values in ref.items():
    want = sum(x for x, m in zip(values, mask) if m)
    np.testing.assert_allclose(sums[name], want, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(means[name], want / mask.sum(), rtol=1e-6)
  # HR is monotone in K and bounds NDCG and MRR.
  for k in KS:
    assert means[f"hr@{k}"] >= means[f"ndcg@{k}"] >= means[f"mrr@{k}"]


def test_ranking_metrics_known_values():
  sums = ranking_metrics(jnp.array([1, 2, 3, 11]), ks=(3, 10))
  m = metrics.finalize(sums)
  assert m["hr@3"] == pytest.approx(3 / 4)
  assert m["hr@10"] == pytest.approx(3 / 4)
  assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
  assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 4)


def test_finalize_standard_errors_from_sums_of_squares():
  rng = np.random.default_rng(5)
  ranks = rng.integers(1, 30, size=41)
  mask = rng.random(41) < 0.8
  sums = jax.device_get(metrics.ranking_metrics(jnp.asarray(ranks), KS, jnp.asarray(mask),
                                                with_squares=True))
  out = metrics.finalize(sums)
  per = jax.device_get(metrics.per_example_metrics(jnp.asarray(ranks), KS))
  for name in metrics.metric_names(KS):
    kept = np.asarray(per[name], np.float64)[mask]
    np.testing.assert_allclose(out[name], kept.mean(), rtol=1e-6)
    np.testing.assert_allclose(out[name + "_se"],
                               kept.std(ddof=1) / np.sqrt(mask.sum()), rtol=1e-4,
                               atol=1e-7, err_msg=name)
  assert not any(k.endswith("_sq") for k in out)
  # One example: a mean but no standard error.
  one = metrics.finalize(metrics.ranking_metrics(jnp.array([2]), (5,), with_squares=True))
  assert set(one) == {"hr@5", "ndcg@5", "mrr@5"}
  with pytest.raises(ValueError, match="no matching sum"):
    metrics.finalize({"count": 3.0, "hr@5_sq": 1.0})


def test_finalize_rejects_empty():
  with pytest.raises(ValueError, match="no examples"):
    metrics.finalize(ranking_metrics(jnp.ones(3), mask=jnp.zeros(3, bool)))


def test_batched_sums_equal_whole_sums():
  rng = np.random.default_rng(2)
  ranks = rng.integers(1, 40, size=37)
  whole = ranking_metrics(ranks, KS)
  acc = {}
  for start in range(0, 37, 16):
    part = np.zeros(16, ranks.dtype)
    n = min(16, 37 - start)
    part[:n] = ranks[start:start + n]
    for key, val in ranking_metrics(part, KS, np.arange(16) < n).items():
      acc[key] = acc.get(key, 0.0) + np.float64(val)
  for key in whole:
    np.testing.assert_allclose(acc[key], whole[key], rtol=1e-6)


# ----------------------------------------------------------------------------
# Sampled candidates


@pytest.mark.parametrize("ties", TIES)
def test_candidate_ranks_matches_reference(ties):
  rng = np.random.default_rng(3)
  b, v, m = 40, 50, 12
  scores = tied_scores(rng, b, v, levels=5)
  scores[:, 0] = 99.0
  targets = rng.integers(1, v, size=b).astype(np.int32)
  negatives = metrics.sample_negatives(rng, v - 1, targets, num_negatives=m)
  negatives[0, -3:] = 0  # padding negatives are ignored
  got = np.asarray(candidate_ranks(scores, targets, negatives, ties=ties))
  want = [ref_rank(scores[i], targets[i], ties=ties,
                   candidates=[j for j in negatives[i] if j != 0])
          for i in range(b)]
  np.testing.assert_array_equal(got, np.asarray(want, got.dtype))
  assert got.max() <= m + 1


def test_candidate_nan_rows():
  scores = np.array([[0, 1, np.nan, 3], [0, 1, np.nan, 3]], np.float32)
  targets = np.array([1, 1], np.int32)
  negatives = np.array([[2, 3], [3, 0]], np.int32)
  np.testing.assert_array_equal(
      candidate_nan_rows(scores, targets, negatives), [True, False])
  np.testing.assert_array_equal(
      candidate_ranks(scores, targets, negatives), [2, 2])


def _check_negatives(neg, targets, num_items, excluded=None):
  assert neg.dtype == np.int32
  assert np.all((neg >= 1) & (neg <= num_items))
  assert not np.any(neg == targets[:, None])
  for i, row in enumerate(neg):
    assert len(set(row.tolist())) == len(row), f"row {i} repeats an item"
    if excluded is not None:
      assert not set(row.tolist()) & set(excluded[i]), f"row {i} excluded"


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_sample_negatives_invariants_and_determinism(strategy):
  num_items, b, m = 300, 64, 100
  rng = np.random.default_rng(4)
  targets = rng.integers(1, num_items + 1, size=b).astype(np.int32)
  excluded = [rng.choice(np.arange(1, num_items + 1), size=rng.integers(0, 150),
                         replace=False) for _ in range(b)]
  pop = rng.integers(0, 50, size=num_items + 1)
  pop[0] = 10**6  # padding weight must be ignored
  kw = dict(num_negatives=m, strategy=strategy, popularity=pop,
            exclude=[set(e.tolist()) for e in excluded])
  neg = metrics.sample_negatives(np.random.default_rng(7), num_items, targets,
                                 **kw)
  assert neg.shape == (b, m)
  _check_negatives(neg, targets, num_items, excluded)
  if strategy == "popularity":
    assert not np.isin(neg, np.flatnonzero(pop[1:] == 0) + 1).any()
  again = metrics.sample_negatives(np.random.default_rng(7), num_items,
                                   targets, **kw)
  np.testing.assert_array_equal(neg, again)
  other = metrics.sample_negatives(np.random.default_rng(8), num_items,
                                   targets, **kw)
  assert not np.array_equal(neg, other)


def test_sample_negatives_exclude_formats_agree():
  num_items = 40
  histories = np.array([[0, 0, 3, 4, 5], [1, 2, 2, 9, 7], [0, 0, 0, 0, 0]],
                       np.int32)
  targets = np.array([6, 9, 1], np.int32)
  sets = [set(h[h != 0].tolist()) for h in histories]
  lengths = [len(s) for s in sets]

  class Csr:
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([sorted(s) for s in sets]).astype(np.int64)

  outs = [metrics.sample_negatives(np.random.default_rng(0), num_items, targets,
                                   num_negatives=30, exclude=e)
          for e in (histories, sets, Csr())]
  for out in outs[1:]:
    np.testing.assert_array_equal(outs[0], out)
  _check_negatives(outs[0], targets, num_items, [list(s) for s in sets])


def test_sample_negatives_fallback_when_mass_is_banned():
  # Nearly all popularity mass sits on the target and banned items, so the
  # rejection rounds fail and the explicit fallback has to finish the rows.
  num_items = 30
  pop = np.ones(num_items + 1, np.int64)
  pop[1:6] = 10**9
  targets = np.full(20, 1, np.int32)
  excluded = [[2, 3, 4, 5]] * 20
  neg = metrics.sample_negatives(
      np.random.default_rng(0), num_items, targets, num_negatives=25,
      strategy="popularity", popularity=pop, exclude=excluded)
  _check_negatives(neg, targets, num_items, excluded)
  np.testing.assert_array_equal(np.sort(neg, axis=1),
                                np.tile(np.arange(6, 31), (20, 1)))


def test_sample_negatives_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="only 7 items"):
    metrics.sample_negatives(rng, 10, np.array([1]), num_negatives=8,
                             exclude=[[2, 3]])
  with pytest.raises(ValueError, match="popularity"):
    metrics.sample_negatives(rng, 10, np.array([1]), strategy="popularity")
  with pytest.raises(ValueError, match="targets"):
    metrics.sample_negatives(rng, 10, np.array([0]), num_negatives=2)
  with pytest.raises(ValueError, match="only 2 items"):
    pop = np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    metrics.sample_negatives(rng, 10, np.array([1]), num_negatives=3,
                             strategy="popularity", popularity=pop)


def test_popularity_sampling_follows_distribution():
  # One negative per row: its law is popularity restricted to non-targets.
  num_items, b = 10, 10000
  pop = np.arange(num_items + 1, dtype=np.int64)  # item j has weight j
  targets = np.ones(b, np.int32)
  neg = metrics.sample_negatives(np.random.default_rng(0), num_items, targets,
                                 num_negatives=1, strategy="popularity",
                                 popularity=pop)[:, 0]
  observed = np.bincount(neg, minlength=num_items + 1)[2:]
  expected = b * pop[2:] / pop[2:].sum()
  chi2 = np.sum((observed - expected) ** 2 / expected)
  assert chi2 < 26.1  # 8 degrees of freedom, p = 0.001
  # A uniform sampler would be rejected by the same test.
  uniform = np.full(9, b / 9)
  assert np.sum((observed - uniform) ** 2 / uniform) > 1000


def test_popularity_sampling_without_replacement_is_successive():
  # 3 of 4 allowed items with weights 1, 2, 3, 4: P(item left out) is exact.
  w = {2: 1.0, 3: 2.0, 4: 3.0, 5: 4.0}
  p_left_out = dict.fromkeys(w, 0.0)
  for order in itertools.permutations(w):
    prob, remaining = 1.0, sum(w.values())
    for item in order[:3]:
      prob *= w[item] / remaining
      remaining -= w[item]
    p_left_out[order[3]] += prob
  b = 10000
  pop = np.array([0, 1, 1, 2, 3, 4], np.int64)
  neg = metrics.sample_negatives(
      np.random.default_rng(1), 5, np.ones(b, np.int32), num_negatives=3,
      strategy="popularity", popularity=pop)
  left_out = 14 - neg.sum(axis=1)  # 2 + 3 + 4 + 5 minus the chosen three
  for item, p in p_left_out.items():
    freq = np.mean(left_out == item)
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / b), (item, freq, p)


def test_uniform_sampling_is_uniform():
  num_items, b = 12, 12000
  neg = metrics.sample_negatives(np.random.default_rng(2), num_items,
                                 np.full(b, 3, np.int32), num_negatives=4)
  counts = np.bincount(neg.ravel(), minlength=num_items + 1)
  assert counts[0] == counts[3] == 0
  expected = b * 4 / 11
  chi2 = np.sum((counts[1:][np.arange(1, 13) != 3] - expected) ** 2 / expected)
  assert chi2 < 29.6  # 10 degrees of freedom, p = 0.001

"""Tests for recjax.evaluation: protocol, padded batches, sharding."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax import evaluation
from recjax import metrics

NUM_ITEMS = 63  # V = 64 score columns, divisible by 8 devices
KS = (1, 5, 10, 20)


def score_fn(params, histories):
  """Sum of history embeddings dotted with every item: float32[B, V].

  Integer-valued embeddings make every score an exact small integer, so ties
  are frequent and results do not depend on the reduction order.
  """
  emb = params["emb"]
  user = jnp.sum(emb[histories] * (histories != 0)[..., None], axis=1)
  return user @ emb.T


def make_data(num_users=37, length=6, seed=0):
  rng = np.random.default_rng(seed)
  params = {"emb": rng.integers(-1, 2, size=(NUM_ITEMS + 1, 3)).astype(
      np.float32)}
  histories = rng.integers(1, NUM_ITEMS + 1, size=(num_users, length))
  for u, n in enumerate(rng.integers(0, length, size=num_users)):
    histories[u, :n] = 0  # left padding of various lengths
  histories = histories.astype(np.int32)
  targets = rng.integers(1, NUM_ITEMS + 1, size=num_users).astype(np.int32)
  # Some targets repeat a history item: they must still be ranked.
  targets[:5] = np.where(histories[:5, -1] != 0, histories[:5, -1], targets[:5])
  popularity = rng.integers(0, 30, size=NUM_ITEMS + 1).astype(np.int64)
  return params, histories, targets, popularity


def reference_results(params, histories, targets, protocol, negatives=None):
  """Brute force: float64 NumPy scores, Python loops over users and items."""
  emb = np.asarray(params["emb"], np.float64)
  ranks = []
  for u in range(len(targets)):
    hist = [int(i) for i in histories[u] if i != 0]
    scores = emb[hist].sum(axis=0) @ emb.T if hist else np.zeros(len(emb))
    t = int(targets[u])
    if protocol.candidates == "full":
      competitors = [j for j in range(1, len(emb)) if j != t and not (
          protocol.exclude_history and j in hist)]
    else:
      competitors = [int(j) for j in negatives[u]]
    above = sum(scores[j] > scores[t] for j in competitors)
    equal = sum(scores[j] == scores[t] for j in competitors)
    ranks.append({"pessimistic": 1 + above + equal, "optimistic": 1 + above,
                  "average": 1 + above + equal / 2}[protocol.ties])
  out = {}
  for k in protocol.ks:
    per_user = {
        "hr": [float(r <= k) for r in ranks],
        "ndcg": [1 / math.log2(r + 1) if r <= k else 0 for r in ranks],
        "mrr": [1 / r if r <= k else 0 for r in ranks]}
    for name, values in per_user.items():
      out[f"{name}@{k}"] = np.mean(values)
      # Standard error of the mean: sample std (ddof=1) / sqrt(n).
      out[f"{name}@{k}_se"] = np.std(values, ddof=1) / math.sqrt(len(values))
  out["num_examples"] = len(ranks)
  return out, ranks


def assert_results_equal(got, want):
  assert set(want) <= set(got)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7,
                               err_msg=key)


PROTOCOLS = [
    dict(ranking="full", exclude_history=False, ties="pessimistic"),
    dict(ranking="full", exclude_history=True, ties="average"),
    dict(ranking="sampled-uniform-20", exclude_history=False,
         ties="optimistic"),
    dict(ranking="sampled-popularity-20", exclude_history=True,
         ties="average"),
]


@pytest.mark.parametrize("spec", PROTOCOLS, ids=lambda s: "-".join(
    str(v) for v in s.values()))
def test_padded_last_batch_matches_reference(spec):
  params, histories, targets, popularity = make_data()
  spec = dict(spec)
  protocol = evaluation.Protocol.from_ranking(
      spec.pop("ranking"), num_items=NUM_ITEMS, ks=KS, **spec)
  small = evaluation.RankingEvaluator(score_fn, protocol, batch_size=16)
  large = evaluation.RankingEvaluator(score_fn, protocol, batch_size=64)
  got16 = small.run(params, histories, targets, seed=3, popularity=popularity)
  got64 = large.run(params, histories, targets, seed=3, popularity=popularity)

  negatives = None
  if protocol.candidates == "sampled":
    negatives = metrics.sample_negatives(
        np.random.default_rng(3), NUM_ITEMS, targets, protocol.num_negatives,
        protocol.sampling, popularity,
        exclude=histories if protocol.exclude_history else None)
    np.testing.assert_array_equal(
        negatives, small.sample_negatives(histories, targets, 3, popularity))
  want, _ = reference_results(params, histories, targets, protocol, negatives)

  assert got16["num_examples"] == got64["num_examples"] == 37
  assert got16["num_nan_rows"] == 0
  assert_results_equal(got16, want)
  assert_results_equal(got64, got16)
  assert small.num_traces == 1  # 3 batches, one of them padded, one trace
  assert small.protocol is protocol


def test_no_recompilation_across_batches_and_runs():
  params, histories, targets, _ = make_data(num_users=37)
  protocol = evaluation.Protocol(num_items=NUM_ITEMS, exclude_history=True)
  counted = chex.assert_max_traces(score_fn, n=1)
  ev = evaluation.RankingEvaluator(counted, protocol, batch_size=8)
  first = ev.run(params, histories, targets)  # 5 batches, the last padded
  second = ev.run(params, histories[:9], targets[:9])  # fewer users, padded
  assert ev.num_traces == 1
  assert first["num_examples"] == 37 and second["num_examples"] == 9
  want, _ = reference_results(params, histories[:9], targets[:9], protocol)
  assert_results_equal(second, want)


def test_exclude_history_changes_ranks_as_reference_says():
  # Items 1..5; user history [1, 2, 4] with target 4 (a repeated item).
  num_items = 5
  scores = np.array([0.0, 9.0, 8.0, 1.0, 5.0, 7.0], np.float32)

  def fixed_scores(params, histories):
    del params
    return jnp.broadcast_to(scores, (histories.shape[0], scores.shape[0]))

  histories = np.array([[0, 1, 2, 4], [0, 0, 0, 3]], np.int32)
  targets = np.array([4, 5], np.int32)
  results = {}
  for exclude in (False, True):
    protocol = evaluation.Protocol(num_items=num_items, ks=(1, 2, 3, 4),
                                   exclude_history=exclude)
    ev = evaluation.RankingEvaluator(fixed_scores, protocol, batch_size=4)
    results[exclude] = ev.run(None, histories, targets)
  # Not excluded: target 4 is below 1, 2, 5 -> rank 4; target 5 -> rank 3.
  # Excluded: user 0 loses 1 and 2 but keeps its target 4 -> rank 2 (5 above);
  # user 1 loses item 3 (below 5 anyway) -> rank still 3.
  assert results[False]["hr@3"] == 0.5 and results[False]["hr@4"] == 1.0
  assert results[True]["hr@1"] == 0.0 and results[True]["hr@2"] == 0.5
  assert results[True]["mrr@4"] == pytest.approx((1 / 2 + 1 / 3) / 2)
  assert results[False]["mrr@4"] == pytest.approx((1 / 4 + 1 / 3) / 2)
  mask = evaluation.history_mask(jnp.asarray(histories), 6)
  np.testing.assert_array_equal(
      jax.jit(metrics.target_ranks)(jnp.broadcast_to(scores, (2, 6)), targets,
                                    mask), [2, 3])


def test_seen_items_beyond_the_window_are_excluded():
  """The model sees the last L items; exclusion (full ranking and sampled negatives)
  covers every item seen before the target."""
  from recjax.data.types import ItemSets  # pylint: disable=g-import-not-at-top
  num_items = 6
  scores = np.array([0.0, 9.0, 8.0, 1.0, 5.0, 7.0, 2.0], np.float32)

  def fixed_scores(params, histories):
    del params
    return jnp.broadcast_to(scores, (histories.shape[0], scores.shape[0]))

  # User 0 saw 1, 2, 3 (window: [2, 3]); user 1 saw 3 (window [0, 3]). Targets 5, 4.
  histories = np.array([[2, 3], [0, 3]], np.int32)
  targets = np.array([5, 4], np.int32)
  seen = ItemSets(np.array([1, 2, 3, 3], np.int32), np.array([0, 3, 4]))
  protocol = evaluation.Protocol(num_items=num_items, ks=(1, 2, 3), exclude_history=True)
  ev = evaluation.RankingEvaluator(fixed_scores, protocol, batch_size=1)
  window = ev.run(None, histories, targets)
  full = ev.run(None, histories, targets, seen=seen)
  # Window only: item 1 (score 9) still beats user 0's target 5 -> rank 2; with
  # everything seen excluded it is rank 1. User 1's target 4 is rank 4 either way.
  assert window["hr@1"] == 0.0 and full["hr@1"] == 0.5
  assert window["mrr@3"] == pytest.approx(0.25) and full["mrr@3"] == pytest.approx(0.5)
  sampled = evaluation.Protocol(num_items=num_items, ks=(1,), exclude_history=True,
                                candidates="sampled", num_negatives=2, sampling="uniform")
  ev = evaluation.RankingEvaluator(fixed_scores, sampled, batch_size=2)
  for seed in range(20):
    negatives = ev.sample_negatives(histories, targets, seed, seen=seen)
    assert not set(negatives[0].tolist()) & {1, 2, 3, 5}
  with pytest.raises(ValueError, match="seen has 1 users, targets 2"):
    ev.run(None, histories, targets, seen=ItemSets(seen.indices[:3], seen.indptr[:2]))


def test_sharded_params_and_batch_match_single_device():
  assert jax.device_count() == 8
  params, histories, targets, popularity = make_data(num_users=37)
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  for ranking in ("full", "sampled-popularity-20"):
    protocol = evaluation.Protocol.from_ranking(
        ranking, num_items=NUM_ITEMS, ks=KS, exclude_history=True)
    single = evaluation.RankingEvaluator(score_fn, protocol, batch_size=16).run(
        params, histories, targets, seed=1, popularity=popularity)
    with jax.set_mesh(mesh):
      sharded_params = jax.device_put(
          params, jax.sharding.NamedSharding(mesh, P("data", None)))
      assert len(sharded_params["emb"].sharding.device_set) == 8
      ev = evaluation.RankingEvaluator(
          score_fn, protocol, batch_size=16,
          batch_sharding=jax.sharding.NamedSharding(mesh, P("data")))
      sharded = ev.run(sharded_params, histories, targets, seed=1,
                       popularity=popularity)
    assert ev.num_traces == 1
    assert sharded == single


def test_batch_size_must_divide_data_shards():
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec("data"))
  protocol = evaluation.Protocol(num_items=NUM_ITEMS)
  with pytest.raises(ValueError, match="not divisible by the 8 data shards"):
    evaluation.RankingEvaluator(score_fn, protocol, batch_size=12,
                                batch_sharding=sharding)
  # Several mesh axes on the batch dimension multiply; the others do not count.
  mesh2 = jax.make_mesh((4, 2), ("data", "fsdp"),
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
  both = jax.sharding.NamedSharding(mesh2, jax.sharding.PartitionSpec(
      ("data", "fsdp")))
  with pytest.raises(ValueError, match="not divisible by the 8 data shards"):
    evaluation.RankingEvaluator(score_fn, protocol, batch_size=4,
                                batch_sharding=both)
  data_only = jax.sharding.NamedSharding(mesh2,
                                         jax.sharding.PartitionSpec("data"))
  evaluation.RankingEvaluator(score_fn, protocol, batch_size=4,
                              batch_sharding=data_only)


def test_nan_rows_count_only_real_rows():
  params, histories, targets, _ = make_data(num_users=10)

  def nan_fn(params, histories):
    scores = score_fn(params, histories)
    return scores.at[-1, :].set(jnp.nan)  # last row of every batch

  protocol = evaluation.Protocol(num_items=NUM_ITEMS)
  ev = evaluation.RankingEvaluator(nan_fn, protocol, batch_size=4,
                                   nan_policy="count")
  results = ev.run(params, histories, targets)
  # Batches hold users 0-3, 4-7, 8-9 + 2 padding rows: only 2 real NaN rows.
  assert results["num_nan_rows"] == 2
  assert results["num_examples"] == 10
  assert "WARNING" in evaluation.format_results(results, protocol)
  with pytest.raises(FloatingPointError, match="2 of 10 rows"):
    evaluation.RankingEvaluator(nan_fn, protocol, batch_size=4).run(
        params, histories, targets)


def test_bad_inputs_are_rejected():
  params, histories, targets, _ = make_data(num_users=5)
  protocol = evaluation.Protocol(num_items=NUM_ITEMS)
  ev = evaluation.RankingEvaluator(score_fn, protocol, batch_size=4)
  with pytest.raises(ValueError, match="targets"):
    ev.run(params, histories, np.zeros(5, np.int32))
  with pytest.raises(ValueError, match="columns"):
    evaluation.RankingEvaluator(
        score_fn, evaluation.Protocol(num_items=10), batch_size=4).run(
            params, np.minimum(histories, 10), np.ones(5, np.int32))
  sampled = evaluation.Protocol.from_ranking("sampled-popularity-10",
                                             num_items=NUM_ITEMS)
  with pytest.raises(ValueError, match="popularity"):
    evaluation.RankingEvaluator(score_fn, sampled, batch_size=4).run(
        params, histories, targets)


def test_protocol_header_dict_and_validation():
  full = evaluation.Protocol(num_items=1682, split="test")
  assert str(full) == ("test | full ranking over 1682 items | history not "
                       "excluded | ties pessimistic | HR/NDCG/MRR@5,10,20")
  assert full.ranking == "full"
  d = full.to_dict()
  assert d["ranking"] == "full" and d["ks"] == [5, 10, 20]
  assert d["exclude_history"] is False and d["num_negatives"] is None

  sampled = evaluation.Protocol.from_ranking(
      "sampled-popularity-100", num_items=1682, split="valid",
      exclude_history=True, ks=(10,))
  assert sampled.num_negatives == 100 and sampled.sampling == "popularity"
  assert sampled.ranking == "sampled-popularity-100"
  assert str(sampled) == (
      "valid | sampled ranking: target vs 100 popularity negatives (of 1682 "
      "items) | history excluded | ties pessimistic | HR/NDCG/MRR@10")
  default = evaluation.Protocol(num_items=500, candidates="sampled")
  assert default.ranking == "sampled-uniform-100"

  # Sampling fields mean nothing for full ranking: normalised away.
  assert evaluation.Protocol(num_items=9, num_negatives=5,
                             sampling="uniform") == evaluation.Protocol(
                                 num_items=9)
  bad = [dict(split="train"), dict(candidates="top"), dict(ks=(10, 5)),
         dict(ks=()), dict(ties="random"),
         dict(candidates="sampled", sampling="zipf"),
         dict(candidates="sampled", num_negatives=1682)]
  for kw in bad:
    with pytest.raises(ValueError):
      evaluation.Protocol(num_items=1682, **kw)
  with pytest.raises(ValueError):
    evaluation.Protocol(num_items=0)
  with pytest.raises(ValueError):
    evaluation.Protocol.from_ranking("sampled-100", num_items=10)


def test_format_results():
  protocol = evaluation.Protocol(num_items=NUM_ITEMS, ks=(5, 10))
  params, histories, targets, _ = make_data()
  results = evaluation.RankingEvaluator(score_fn, protocol, 16).run(
      params, histories, targets)
  text = evaluation.format_results(results, protocol)
  lines = text.splitlines()
  assert lines[0] == str(protocol)
  assert lines[1].split() == ["K", "HR", "NDCG", "MRR"]
  cells = [[f"{results[f'{m}@5']:.4f}", "+-", f"{results[f'{m}@5_se']:.4f}"]
           for m in ("hr", "ndcg", "mrr")]
  assert lines[2].split() == ["5", *cells[0], *cells[1], *cells[2]]
  assert lines[-1] == "users: 37 | +- = standard error of the mean over users"
  # Without standard errors (e.g. results from an older results.json): means only.
  plain = {k: v for k, v in results.items() if not k.endswith("_se")}
  lines = evaluation.format_results(plain, protocol).splitlines()
  assert lines[2].split() == ["5", f"{results['hr@5']:.4f}",
                              f"{results['ndcg@5']:.4f}",
                              f"{results['mrr@5']:.4f}"]
  assert lines[-1] == "users: 37"

"""Routing by CRM entropy: 0% is the CRM alone, 100% the LLM alone, in between the most
uncertain samples go to the LLM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recjax import metrics as metrics_lib
from recjax import routing
from recjax.train.joint_task import JointTask

import joint_testing as jt


def _only(scores, targets, ks=(5, 10, 20)):
  ranks = metrics_lib.target_ranks(jnp.asarray(scores), jnp.asarray(targets))
  return metrics_lib.finalize(jax.tree.map(
      np.asarray, metrics_lib.ranking_metrics(ranks, ks, with_squares=True)))


def test_entropy_routes_the_least_confident_samples():
  logits = np.zeros((4, 6), np.float32)
  logits[0, 3] = 10.0          # confident
  logits[2, 1] = 2.0           # somewhat confident
  logits[:, 0] = 100.0         # padding column is ignored
  h = np.asarray(routing.next_item_entropy(jnp.asarray(logits)))
  np.testing.assert_allclose(h[1], np.log(5), rtol=1e-5)
  assert h[0] < h[2] < h[1] and abs(h[1] - h[3]) < 1e-6
  send = lambda f: np.asarray(routing.route_to_llm(jnp.asarray(h), f))
  np.testing.assert_array_equal(send(0.0), [False] * 4)
  np.testing.assert_array_equal(send(0.5), [False, True, False, True])
  np.testing.assert_array_equal(send(0.25), [False, True, False, False])   # tie: index
  np.testing.assert_array_equal(send(0.75), [False, True, True, True])
  np.testing.assert_array_equal(send(1.0), [True] * 4)
  np.testing.assert_allclose(routing.binary_entropy(jnp.array([0.5])), [np.log(2)],
                             rtol=1e-6)


def test_routing_extremes_equal_crm_only_and_llm_only():
  task = JointTask(jt.CONFIG)
  params = jt.jit(lambda r: nn.unbox(task.init(r)))(jax.random.key(0))
  batch, catalogue = jt.batch(size=32), jt.catalogue()
  crm, llm = jt.jit(task.scores)(params, batch, catalogue)
  targets = batch["target"]
  curve = routing.routing_curve(crm, llm, targets, fractions=(0.0, 0.5, 1.0))
  assert [c["routed"] for c in curve] == [0, 16, 32]
  crm_only, llm_only = _only(crm, targets), _only(llm, targets)
  assert crm_only != llm_only
  assert {k: v for k, v in curve[0].items() if "@" in k} == crm_only
  assert {k: v for k, v in curve[2].items() if "@" in k} == llm_only
  # Half-way: exactly the 16 highest-entropy rows use the LLM's scores.
  h = np.asarray(routing.next_item_entropy(crm))
  mixed = np.where((h >= np.sort(h)[16])[:, None], llm, crm)
  assert {k: v for k, v in curve[1].items() if "@" in k} == _only(mixed, targets)


def test_entropy_with_minus_infinity_and_excluded_items():
  """-inf logits are items of probability 0 (not NaN, which would never be routed); the
  entropy covers the ranked items only when `exclude` is given."""
  logits = jnp.array([[0.0, 1.0, -jnp.inf, 2.0], [0.0, 1.0, 1.0, 1.0]])
  h = routing.next_item_entropy(logits)
  assert bool(jnp.all(jnp.isfinite(h)))
  np.testing.assert_allclose(h[0], routing.next_item_entropy(logits[:1, [0, 1, 3]])[0],
                             rtol=1e-6)
  np.testing.assert_allclose(h[1], np.log(3.0), rtol=1e-6)
  exclude = jnp.array([[False, False, False, False], [False, True, False, False]])
  np.testing.assert_allclose(routing.next_item_entropy(logits, exclude)[1], np.log(2.0),
                             rtol=1e-6)

"""The jitted update: sharded == single-device, no recompilation, purity."""

import jax
import ml_collections
import numpy as np
import pytest

from recjax import sharding as shd
from recjax.models.sasrec import SASRecConfig
from recjax.train import optimizer
from recjax.train import state as state_lib
from recjax.train import step as step_lib
from recjax.train.sequential import SequentialTask

CFG = SASRecConfig(num_items=40, max_len=10, hidden=16, num_blocks=2,
                   num_heads=2, mlp_dim=32, dropout=0.2, attn_dropout=0.2,
                   item_table_multiple=8)
OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
    schedule="cosine", warmup_steps=2))


def _batches(n, batch=16, s=3):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    inputs = rng.integers(0, 41, (batch, 10)).astype(np.int32)
    inputs[:, :3] = 0
    out.append({"inputs": inputs,
                "labels": rng.integers(1, 41, (batch, s)).astype(np.int32),
                "mask": rng.random((batch, s)) < 0.8})
  return out


def _train(mesh, rules, batches, traces=None, loss_type="ce"):
  task = SequentialTask(CFG, loss_type=loss_type, num_negatives=2)
  loss_fn = task.loss
  if traces is not None:
    def loss_fn(params, batch, rng):
      traces.append(1)
      return task.loss(params, batch, rng)
  tx = optimizer.make_optimizer(OPTIM, 10)
  state, sharding = state_lib.create_train_state(
      task.init, tx, mesh, rules, jax.random.key(0))
  step = step_lib.make_train_step(loss_fn, tx, sharding, mesh)
  losses = []
  for b in batches:
    state, metrics = step(state, shd.global_batch(b, mesh), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return state, np.array(losses), sharding


@pytest.fixture(scope="module")
def single_device_run():
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return _train(mesh, "dp", _batches(4))


@pytest.mark.parametrize("shape,rules", [
    ((8, 1, 1), "dp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")])
def test_sharded_step_equals_single_device(single_device_run, shape, rules):
  assert jax.device_count() == 8
  ref_state, ref_losses, _ = single_device_run
  state, losses, sharding = _train(shd.make_mesh(shape), rules, _batches(4))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The parameters really are laid out as the rules say.
  emb = state.params["item_embedding"]["embedding"]
  if rules != "dp":
    assert emb.sharding.spec != jax.sharding.PartitionSpec()
    assert len(emb.addressable_shards) == 8
    assert emb.addressable_shards[0].data.shape != emb.shape


def test_no_recompilation_across_steps():
  traces = []
  _, losses, _ = _train(shd.make_mesh((8, 1, 1)), "dp", _batches(5),
                        traces=traces)
  assert len(traces) == 1
  assert np.all(np.isfinite(losses))


def test_step_is_a_pure_function_of_state_batch_rng():
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  a, la, _ = _train(mesh, "dp", _batches(3), loss_type="bce")
  b, lb, _ = _train(mesh, "dp", _batches(3), loss_type="bce")
  np.testing.assert_array_equal(la, lb)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a.step) == 3


def test_ema_params_follow_the_params():
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  task = SequentialTask(CFG)
  tx = optimizer.make_optimizer(OPTIM, 10)
  state, sharding = state_lib.create_train_state(
      task.init, tx, mesh, "dp", jax.random.key(0), ema=True)
  init = jax.tree.map(np.asarray, state.params)
  step = step_lib.make_train_step(task.loss, tx, sharding, mesh, ema_decay=0.9)
  state, _ = step(state, shd.global_batch(_batches(1)[0], mesh),
                  jax.random.key(1))
  for e, p, p0 in zip(jax.tree.leaves(state.ema_params),
                      jax.tree.leaves(state.params), jax.tree.leaves(init)):
    np.testing.assert_allclose(e, p0 + 0.1 * (np.asarray(p) - p0), atol=1e-6)
  assert state.eval_params() is state.ema_params

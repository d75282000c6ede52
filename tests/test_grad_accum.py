"""Gradient accumulation: a k-micro-batch step equals the full-batch step (dropout off)."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from recjax import sharding as shd
from recjax.models.sasrec import SASRecConfig
from recjax.train import joint_step
from recjax.train import optimizer
from recjax.train import state as state_lib
from recjax.train import step as step_lib
from recjax.train.joint_task import JointTask, stage_controls
from recjax.train.sequential import SequentialTask

import joint_testing as jt

# Adam's eps=1e-3 keeps near-zero gradient elements from turning summation-order noise
# into full-size steps (see test_joint_sharding.py).
OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.01, grad_clip=1.0,
    schedule="constant", warmup_steps=0))
SASREC = SASRecConfig(num_items=40, max_len=10, hidden=16, num_blocks=2, num_heads=2,
                      mlp_dim=32, dropout=0.0, attn_dropout=0.0, item_table_multiple=8)


def _sasrec_batches(n, batch=16, s=3):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    inputs = rng.integers(0, 41, (batch, 10)).astype(np.int32)
    inputs[:, :3] = 0
    mask = rng.random((batch, s)) < 0.7
    mask[:8:2] = False          # micro-batch 0 (even rows) has fewer targets
    out.append({"inputs": inputs,
                "labels": rng.integers(1, 41, (batch, s)).astype(np.int32),
                "mask": mask})
  return out


def _sasrec_run(mesh, rules, grad_accum):
  task = SequentialTask(SASREC)
  tx = optimizer.make_optimizer(OPTIM, 10)
  state, sharding = state_lib.create_train_state(
      task.init, tx, mesh, rules, jax.random.key(0), compiler_options=jt.FAST_COMPILE)
  step = step_lib.make_train_step(task.loss, tx, sharding, mesh, grad_accum=grad_accum,
                                  compiler_options=jt.FAST_COMPILE)
  metrics = []
  for b in _sasrec_batches(2):
    state, m = step(state, shd.global_batch(b, mesh), jax.random.key(1))
    metrics.append(jax.tree.map(np.asarray, m))
  return state, metrics


def _assert_same(state, metrics, ref_state, ref_metrics, keys):
  for m, r in zip(metrics, ref_metrics):
    for k in keys:
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                          jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_sasrec_accumulation_equals_full_batch():
  """Unequal targets per micro-batch: weighting by num_targets keeps it exact."""
  one = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  ref_state, ref_metrics = _sasrec_run(one, "dp", 1)
  state, metrics = _sasrec_run(one, "dp", 2)
  _assert_same(state, metrics, ref_state, ref_metrics,
               ("loss", "loss_ce", "num_targets", "l2_grads"))
  # And sharded: 4 micro-batches of 4 rows over a (2, 2, 1) mesh.
  state, metrics = _sasrec_run(shd.make_mesh((2, 2, 1), devices=jax.devices()[:4]),
                               "fsdp", 4)
  _assert_same(state, metrics, ref_state, ref_metrics, ("loss", "num_targets"))


def test_indivisible_batch_is_an_error():
  mesh = shd.make_mesh((2, 2, 1), devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="grad_accum=8"):
    step_lib.split_microbatches({"x": np.zeros((16, 2))}, 8, mesh)


@pytest.mark.parametrize("balanced", [True, False])
def test_joint_accumulation_equals_full_batch(balanced):
  """Balanced micro-batches (no masked targets or rows): equal averaging is exact. With
  masked targets and rows spread unevenly, the whole batch's counts (norms_fn) keep it
  exact; each micro-batch's own counts would not."""
  cfg = dataclasses.replace(
      jt.CONFIG, title_mode="cache",
      crm=dataclasses.replace(jt.CRM, dropout=0.0, attn_dropout=0.0),
      llm=jt.LLM.replace(dropout_rate=0.0))
  task = JointTask(cfg, kl_stop_grad="none")
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx = joint_step.make_joint_optimizer(OPTIM, 10)
  init_state, sharding = joint_step.create_joint_train_state(
      task.init, tx, mesh, "dp", jax.random.key(0), compiler_options=jt.FAST_COMPILE)
  rng = np.random.default_rng(3)
  controls = stage_controls(
      {"crm": 1.0, "llm": 1.0, "kl": 0.5, "layer": 0.3},
      {"crm": True, "llm": True, "bridge": True}, init_state.params,
      {"title_table": rng.normal(size=(jt.NUM_ITEMS + 1, jt.LLM.d_model)
                                 ).astype(np.float32)})
  batch = jt.batch(0)
  batch["mask"][:] = True
  batch["target_mask"][:] = True
  if not balanced:  # micro-batches are strided rows: even rows lose most of their targets
    batch["mask"][::2, 1:] = False
    batch["target_mask"][::4] = False
  results = []
  for k in (1, 2):
    step = joint_step.make_joint_train_step(task.loss, tx, sharding, mesh, grad_accum=k,
                                            compiler_options=jt.FAST_COMPILE,
                                            norms_fn=task.normalizers)
    state = jax.tree.map(lambda x: x.copy(), init_state)   # the step donates its state
    state, m = step(state, shd.global_batch(batch, mesh), jax.random.key(1), controls)
    results.append((state, [jax.tree.map(np.asarray, m)]))
  (ref_state, ref_metrics), (state, metrics) = results
  _assert_same(state, metrics, ref_state, ref_metrics,
               ("loss", "loss_crm", "loss_llm", "loss_kl", "loss_layer",
                "grad_norm/crm", "grad_norm/llm", "grad_norm/bridge",
                "num_targets"))   # counts add up over micro-batches (not averaged)


def test_joint_norms_and_micro_batch_weights_are_exclusive():
  with pytest.raises(ValueError, match="norms_fn already makes accumulation exact"):
    joint_step.make_joint_train_step(lambda *a: None, None, None, None, grad_accum=2,
                                     weight_key="num_targets", norms_fn=lambda b: {})

"""The joint step on 8 simulated devices (data, fsdp and tensor axes) equals 1 device."""

import dataclasses
import time

import jax
import numpy as np
import pytest

from recjax import sharding as shd
from recjax.train import joint_step
from recjax.train.joint_task import JointTask, stage_controls

import joint_testing as jt

WEIGHTS = {"crm": 1.0, "llm": 1.0, "kl": 0.5, "layer": 0.3}
# Adam divides by sqrt(v) + eps: with eps=1e-8 a near-zero gradient element becomes a
# full-size step whose sign follows reduction-order noise, which differs between meshes.
# A larger eps keeps the comparison about the step, not about that amplification.
OPTIM = jt.OPTIM.copy_and_resolve_references()
OPTIM.eps = 1e-3


# Title encodings as an input ("cache" mode; the in-step title encoder is tested on one
# device in test_joint.py): the two compiles dominate this test.
CONFIG = dataclasses.replace(jt.CONFIG, title_mode="cache")


def _catalogue():
  rng = np.random.default_rng(3)
  return {"title_table": rng.normal(size=(jt.NUM_ITEMS + 1, jt.LLM.d_model)
                                    ).astype(np.float32)}


def _train(mesh, rules, num_steps=2):
  task = JointTask(CONFIG, kl_stop_grad="none")
  tx = joint_step.make_joint_optimizer(OPTIM, 10)
  state, sharding = joint_step.create_joint_train_state(
      task.init, tx, mesh, rules, jax.random.key(0), compiler_options=jt.FAST_COMPILE)
  step = joint_step.make_joint_train_step(task.loss, tx, sharding, mesh,
                                          compiler_options=jt.FAST_COMPILE)
  controls = stage_controls(WEIGHTS, {"crm": True, "llm": True, "bridge": True},
                            state.params, _catalogue())
  metrics = []
  for i in range(num_steps):
    state, m = step(state, shd.global_batch(jt.batch(i), mesh), jax.random.key(1),
                    controls)
    metrics.append(jax.tree.map(np.asarray, m))
  return state, metrics


def test_sharded_joint_step_equals_single_device():
  assert jax.device_count() == 8
  t0 = time.perf_counter()
  ref_state, ref_metrics = _train(shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                                  "dp")
  t1 = time.perf_counter()
  state, metrics = _train(shd.make_mesh((2, 2, 2)), "fsdp_tp")
  print(f"1 device {t1 - t0:.1f}s, 8 devices {time.perf_counter() - t1:.1f}s")
  for m, r in zip(metrics, ref_metrics):
    for k in ("loss", "loss_crm", "loss_llm", "loss_kl", "loss_layer",
              "grad_norm/crm", "grad_norm/llm", "grad_norm/bridge"):
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                          jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # The parameters really are sharded as the rules say.
  memory = state.params["bridge"]["memory"]["item_memory"]
  shared = state.params["llm"]["shared"]["embedding"]
  assert len(memory.addressable_shards) == 8
  assert memory.addressable_shards[0].data.shape != memory.shape
  assert shared.addressable_shards[0].data.shape != shared.shape


def test_process_rows_must_match_the_devices_batch_shards(monkeypatch):
  """Each process collates B/P rows; its devices must hold one contiguous block of B/P."""
  mesh = shd.make_mesh((4, 2, 1))
  shd.check_process_rows(mesh, 16)           # one process holds every row
  # Pretend to be process 1 of 2 while this process's devices hold the whole batch: the
  # shape of the error a host gets when processes share batch shards.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(ValueError, match=r"process 1 of 2: its devices hold 16 batch rows "
                                       r"\(0\.\.15\), but the input pipeline feeds it 8 "
                                       r"rows"):
    shd.check_process_rows(mesh, 16)

"""A checkpoint written on a 4x2 FSDP mesh restores on other meshes.

The reference run (tests/loop_testing.py) trains on a (data=4, fsdp=2) mesh
with the "fsdp" rules. Its best parameters and its full latest state must
restore, resharded, onto one device and onto a (data=2, fsdp=4) mesh with
equal values; `--mode=eval` there gives the same metrics; and training
continues from the latest state on the other mesh as it would have on the
first. Also: workdirs given as gs:// URLs are not mangled.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import loop_testing as lt
from recjax import sharding as shd
from recjax.train import checkpoint as ckpt_lib
from recjax.train import loop
from recjax.train import optimizer as optim_lib
from recjax.train import state as state_lib
from recjax.train import writers

MESHES = {"one_device": ((1, 1, 1), 1), "2x4": ((2, 4, 1), 8)}


def restore_on(config, workdir, shape, num_devices):
  """(state, best_params, state_sharding) restored onto a new mesh."""
  mesh = shd.make_mesh(shape, jax.devices()[:num_devices])
  task = loop.build_task(config, loop.load_data(config.data).num_items)
  tx = optim_lib.make_optimizer(config.optim, 100)
  state, sharding = state_lib.create_train_state(
      task.init, tx, mesh, config.mesh.rules, jax.random.key(1),
      ema=config.optim.ema_decay > 0)
  ckpt = ckpt_lib.Checkpointer(workdir)
  restored, _ = ckpt.restore(state_lib.abstract_like(state, sharding))
  best, _ = ckpt.restore_best(state_lib.abstract_like(state.params,
                                                      sharding.params))
  ckpt.close()
  return restored, best, sharding


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  config, _, workdir, results = lt.reference_run(tmp_path_factory)
  state, best, _ = restore_on(config, workdir, (4, 2, 1), 8)
  return config, workdir, results, jax.device_get((state, best))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_checkpoints_restore_resharded_with_equal_values(reference,
                                                         mesh_name):
  config, workdir, _, (ref_state, ref_best) = reference
  shape, num_devices = MESHES[mesh_name]
  state, best, sharding = restore_on(config, workdir, shape, num_devices)
  for got, want, target in ((state, ref_state, sharding),
                            (best, ref_best, sharding.params)):
    for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                       jax.tree.leaves(target)):
      assert a.sharding == s
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == int(ref_state.step)


def test_eval_mode_on_the_2x4_mesh_gives_the_same_metrics(reference):
  # (One device evaluates the best checkpoint in the next test.)
  config, workdir, results, _ = reference
  config = lt.apply_overrides(config.copy_and_resolve_references(),
                              {"mesh.shape": (2, 4, 1)})
  again = loop.evaluate(config, workdir)
  assert again["best_step"] == results["best_step"]
  for name, metrics in results["metrics"].items():
    for key, value in metrics.items():
      assert again["metrics"][name][key] == pytest.approx(value, abs=1e-6)


def test_training_continues_from_the_latest_state_on_another_mesh(
    reference, tmp_path):
  config, workdir, results, _ = reference
  # Go back to the checkpoint at step 40 and redo the last steps on one
  # device; the final test then evaluates the best parameters there.
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  total = results["steps"]
  resume_at = max(s for s in lt.checkpoint_steps(copy) if s < total)
  for kind in ("checkpoints", "best"):
    for step in lt.checkpoint_steps(copy, kind):
      if step > resume_at:
        shutil.rmtree(os.path.join(copy, kind, str(step)))
  config = lt.apply_overrides(config.copy_and_resolve_references(),
                              {"mesh.shape": (1, 1, 1)})
  again = loop.train_and_evaluate(config, copy, devices=jax.devices()[:1])
  assert again["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert again["steps"] == total and again["best_step"] == results["best_step"]
  ref_loss, got_loss = lt.train_losses(workdir), lt.train_losses(copy)
  assert got_loss[total] == pytest.approx(ref_loss[total], rel=1e-5)
  for name, metrics in results["metrics"].items():
    for key, value in metrics.items():
      assert again["metrics"][name][key] == pytest.approx(value, abs=1e-6)


def test_urls_are_kept_and_local_paths_made_absolute(monkeypatch, tmp_path):
  assert ckpt_lib.resolve_dir("gs://bucket/run") == "gs://bucket/run"
  assert ckpt_lib.resolve_dir("~/run") == os.path.expanduser("~/run")
  assert os.path.isabs(ckpt_lib.resolve_dir("run"))
  # A URL workdir: the JSONL log is rewritten whole (object stores have no
  # append) and keeps the rows of earlier runs. A local dir stands in for GCS.
  monkeypatch.setattr(writers, "is_url", lambda path: True)
  for step in (1, 2):
    w = writers.MetricWriter(str(tmp_path), tensorboard=False)
    w.write(step, {"train/loss": np.float32(step)})
    w.close()
  rows = lt.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0)]


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX would import PyTorch (seconds of start-up) to type-check values; the
  writer hides it during the import, writes events, and torch stays importable."""
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed: nothing to hide")
  code = (
      "import glob, os, sys\n"
      "from recjax.train import writers\n"
      f"w = writers.MetricWriter({str(tmp_path)!r})\n"
      "w.write(1, {'train/loss': 0.5}); w.close()\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n"
      f"assert glob.glob(os.path.join({str(tmp_path)!r}, 'tensorboard', 'events.*'))\n"
      "import torch\n"
      "print('ok', torch.__name__)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "ok torch" in out.stdout, out.stderr[-2000:]

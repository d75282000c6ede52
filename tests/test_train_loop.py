"""End to end: train + eval on a tiny dataset, --mode=eval, kill and resume."""

import dataclasses
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from loop_testing import BASE_CONFIG, ROOT, latest_params, load_config_file
from loop_testing import tiny_config
from script_testing import load_script
from recjax.data.preprocess import PreprocessConfig
from recjax.train import loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("e2e")
  config, overrides = tiny_config(tmp)
  workdir = str(tmp / "run")
  results = loop.train_and_evaluate(config, workdir)
  return config, overrides, tmp, workdir, results


def test_train_and_evaluate_learns_and_writes_results(trained):
  config, _, _, workdir, results = trained
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["steps"] == results["steps"] > 0
  assert set(on_disk["metrics"]) == {"valid/full", "valid/sampled_pop100",
                                     "test/full", "test/sampled_pop100"}
  assert on_disk["protocols"]["test/full"]["candidates"] == "full"
  assert on_disk["dataset"]["stats"]["users"] == 40
  assert isinstance(on_disk["allocator"], str)   # launcher runs: tests/test_multihost.py
  test = on_disk["metrics"]["test/full"]
  assert test["num_examples"] == 40
  # Random ranking over 120 items gives HR@10 = 0.08; the walk is learnable.
  assert test["hr@10"] > 0.5, test
  # Each mean carries its standard error over the 40 users (HR is 0/1 per user).
  h = test["hr@10"]
  np.testing.assert_allclose(test["hr@10_se"], np.sqrt(h * (1 - h) / 39), rtol=1e-6)
  assert 0 < on_disk["best_step"] <= on_disk["steps"]
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.*"))


def test_benchmark_summary_reads_results(trained):
  """experiments/bench_sasrec_ml100k.py: per-seed rows and the seed summary."""
  *_, results = trained
  bench = load_script("bench_sasrec_ml100k")
  rows = [bench._row(0, results), bench._row(1, results)]
  rows[1]["test_ndcg@10"] += 0.01
  summary = bench._summary(rows)
  test = results["metrics"]["test/full"]
  assert rows[0]["test_ndcg@10_se_users"] == test["ndcg@10_se"]
  ndcg = summary["test_ndcg@10"]
  np.testing.assert_allclose(ndcg["mean"], test["ndcg@10"] + 0.005)
  np.testing.assert_allclose(ndcg["std"], 0.005)                 # population
  np.testing.assert_allclose(ndcg["sem"], 0.005, rtol=1e-6)      # sample std / sqrt(2)
  text = bench._markdown(rows, summary, "cfg.py", [])
  assert f"of one run over its test users {test['ndcg@10_se']:.4f}" in text


def test_eval_mode_restores_the_best_checkpoint(trained):
  config, _, _, workdir, results = trained
  again = loop.evaluate(config, workdir)
  assert again["best_step"] == results["best_step"]
  for name, metrics in results["metrics"].items():
    for key, value in metrics.items():
      assert again["metrics"][name][key] == pytest.approx(value, abs=1e-9)


def test_killed_and_resumed_run_equals_uninterrupted_run(trained):
  config, overrides, tmp, workdir, _ = trained
  resumed_dir = str(tmp / "killed")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "main.py"),
         f"--config={BASE_CONFIG}", f"--workdir={resumed_dir}"]
  full_overrides = dict(overrides, **{
      "data.name": config.data.name, "data.data_dir": config.data.data_dir,
      "data.cache_dir": config.data.cache_dir, "data.download": False})
  cmd += [f"--config.{k}={v}" for k, v in full_overrides.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  ckpt_dir = os.path.join(resumed_dir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir)
                              else []) if d.isdigit()]
    if steps and max(steps) >= 20:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed: " + \
      proc.stderr.read().decode()[-2000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at, _ = latest_params(resumed_dir)
  total = int(json.load(open(os.path.join(workdir, "results.json")))["steps"])
  assert killed_at < total
  loop.train_and_evaluate(config, resumed_dir)        # resumes
  step_a, params_a = latest_params(workdir)
  step_b, params_b = latest_params(resumed_dir)
  assert step_a == step_b == total
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_file_overrides_are_checked():
  config = load_config_file(BASE_CONFIG, {"train.num_epochs": 3, "input.stride": 5})
  assert (config.train.num_epochs, config.input.stride) == (3, 5)
  with pytest.raises(KeyError):                 # a mistyped key is refused
    load_config_file(BASE_CONFIG, {"train.num_epoch": 3})


def test_load_data_forwards_every_preprocessing_field(tmp_path):
  """Each PreprocessConfig field set in `config.data` reaches preprocessing."""
  config, _ = tiny_config(
      tmp_path, {"data.time_order": "recbole", "data.max_seq_len": 12,
                 "data.dedup": "keep_last", "data.min_rating": 1.0,
                 "data.k_core": 2, "data.min_user_interactions": 4})
  data = loop.load_data(config.data)
  fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
  assert set(data.config) == fields
  defaults = PreprocessConfig()
  for name in fields:     # every field set away from its default, and kept
    assert data.config[name] == config.data[name], name
    assert data.config[name] != getattr(defaults, name), name
  assert data.stats["time_order"] == "recbole"
  assert [s["step"] for s in data.stats["steps"]] == [
      "min_rating", "dedup", "k_core", "max_seq_len", "min_user_interactions"]
  assert data.seq_lengths().max() == 12


def test_every_config_file_loads():
  configs = [p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
             if "def get_config" in open(p).read()]
  assert configs
  for path in configs:
    config = load_config_file(path)
    assert config.data and config.train and config.optim and config.mesh, path
    spec = importlib.util.spec_from_file_location("doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__ and len(module.__doc__) > 100, path   # says what it runs
  # The runnable ones build their task from the config.
  sasrec = load_config_file(BASE_CONFIG)
  task = loop.build_task(sasrec, num_items=10)
  assert task.model_cfg.max_len == sasrec.model.max_len


def test_periodic_checkpoints_on_steps_that_are_not_logged(tmp_path, monkeypatch):
  """train.checkpoint_every_steps fires on its own multiples, not only on log steps."""
  from recjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  config, _ = tiny_config(tmp_path, {"train.num_epochs": 2, "train.checkpoint_every_steps": 7,
                                     "train.log_every_steps": 10,
                                     "train.eval_every_steps": 50})
  saved = []
  save = ckpt_lib.Checkpointer.save

  def recording_save(self, step, state, meta):
    saved.append(step)
    return save(self, step, state, meta)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", recording_save)
  steps = loop.train_and_evaluate(config, str(tmp_path / "run"))["steps"]
  assert steps > 14
  want = sorted(set(range(7, steps + 1, 7)) | set(range(50, steps + 1, 50)) | {steps})
  assert saved == want

"""Shared helpers for the end-to-end loop tests: a tiny dataset and config.

`tiny_config(tmp)` writes a learnable RecBole atomic dataset and returns the
SASRec config with tiny overrides; `launch_cmd(...)` builds the command line of
`launch/main.py` for the same config, so subprocess runs (kill/resume,
SIGTERM, multi-process) train exactly what the in-process runs train.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from recjax.configs import load_config_file  # noqa: F401  (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "experiments", "sasrec_ml100k.py")
LAUNCHER = os.path.join(ROOT, "launch", "main.py")


def write_tiny_atomic(directory, users=40, items=120, seed=0):
  """A learnable dataset: each user walks the catalogue in steps of 1 or 2."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "tiny.inter"), "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for u in range(1, users + 1):
      item = int(rng.integers(1, items + 1))
      for t in range(int(rng.integers(15, 25))):
        f.write(f"{u}\t{item}\t5\t{1000 * u + t}\n")
        item = (item + int(rng.integers(1, 3)) - 1) % items + 1
  with open(os.path.join(directory, "tiny.item"), "w") as f:
    f.write("item_id:token\tmovie_title:token_seq\n")
    for i in range(1, items + 1):
      f.write(f"{i}\tMovie {i}\n")
  return os.path.join(directory, "tiny")


OVERRIDES = {
    "model.max_len": 8, "model.hidden": 16, "model.mlp_dim": 32,
    "model.dropout": 0.1, "model.attn_dropout": 0.1,
    "input.stride": 2, "input.batch_size": 16, "optim.lr": 5e-3,
    "train.num_epochs": 12, "train.eval_every_steps": 50,
    "train.log_every_steps": 10, "train.checkpoint_every_steps": 10,
    "train.async_checkpoints": False,   # the sync path; preemption/multi-host tests: async
    "train.patience": 0, "eval.batch_size": 16,
}


def apply_overrides(config, overrides):
  """Sets dotted `overrides` ({"train.num_epochs": 2, ...}) on `config`; an unknown key is
  an error (the config is locked first, as `launch/main.py` loads it)."""
  config.lock()
  config.update_from_flattened_dict(dict(overrides))
  return config


def tiny_config(tmp_path, extra=None):
  """(config, overrides): the tiny run; `extra`: more dotted overrides."""
  config = load_config_file(BASE_CONFIG)
  prefix = write_tiny_atomic(str(tmp_path / "raw"))
  overrides = dict(OVERRIDES)
  overrides.update({"data.name": f"atomic:{prefix}",
                    "data.data_dir": str(tmp_path / "raw"),
                    "data.cache_dir": str(tmp_path / "cache"),
                    "data.download": False})
  overrides.update(extra or {})
  return apply_overrides(config, overrides), overrides


def _flag_value(value):
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1
                                                     else "") + ")"
  return str(value)


def launch_cmd(overrides, workdir, *flags):
  """`python launch/main.py` with the config overrides and extra flags."""
  cmd = [sys.executable, LAUNCHER, f"--config={BASE_CONFIG}",
         f"--workdir={workdir}"]
  cmd += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
  return cmd + list(flags)


def launch_env(num_devices=8, **extra):
  """The environment of a launcher subprocess with simulated CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  env.update(extra)
  return env


def checkpoint_steps(workdir, kind="checkpoints"):
  """Finished checkpoint steps under `<workdir>/<kind>` (sorted)."""
  directory = os.path.join(workdir, kind)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def latest_params(workdir):
  """(step, params) of the latest full-state checkpoint, on one device.

  The targets come from the checkpoint's metadata, so checkpoints written by
  several processes or on any mesh restore here.
  """
  mgr = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  step = mgr.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = mgr.item_metadata(step)["state"]
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
      is_leaf=lambda m: hasattr(m, "shape"))
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))
  mgr.close()
  return step, out["state"]["params"]


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# A short run on a 4x2 (data, fsdp) mesh with FSDP rules: the reference that
# the multi-process, preemption and mesh-change tests compare against.
SHORT = {
    "model.num_blocks": 1, "train.num_epochs": 2, "train.eval_every_steps": 20,
    "train.checkpoint_every_steps": 10, "mesh.shape": (4, 2, 1),
    "mesh.rules": "fsdp",
}

_REFERENCE_RUNS = {}
_COMPILATION_CACHE = []


def cached_launch_env(tmp_path_factory, num_devices=8, **extra):
  """`launch_env` plus a persistent compilation cache shared by the session.

  Launcher runs of the same config on the same devices (the reference, a
  preempted run, its restart) then compile each program once: the cache
  returns the same executables, so their results stay bitwise equal.
  """
  if not _COMPILATION_CACHE:
    _COMPILATION_CACHE.append(str(tmp_path_factory.mktemp("jax_cache")))
  return launch_env(num_devices, JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE[0],
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)


def run_launcher(overrides, workdir, env, *flags, timeout=400):
  """Runs launch/main.py to the end; returns its output (fails on rc != 0)."""
  proc = subprocess.run(launch_cmd(overrides, workdir, *flags), env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout


def reference_run(tmp_path_factory, extra=None):
  """(config, overrides, workdir, results) of the SHORT run, trained once.

  `launch/main.py` on 8 simulated devices, memoised for the whole session, so
  test modules that compare against it share one run. Treat the workdir as
  read-only (copy it before resuming from it).
  """
  extra = dict(SHORT, **(extra or {}))
  key = tuple(sorted(extra.items()))
  if key not in _REFERENCE_RUNS:
    tmp = tmp_path_factory.mktemp("reference")
    config, overrides = tiny_config(tmp, extra)
    workdir = str(tmp / "run")
    run_launcher(overrides, workdir, cached_launch_env(tmp_path_factory))
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    _REFERENCE_RUNS[key] = (config, overrides, workdir, results)
  return _REFERENCE_RUNS[key]


def train_losses(workdir):
  """{step: train/loss} from `<workdir>/metrics.jsonl`."""
  return {r["step"]: r["train/loss"]
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]

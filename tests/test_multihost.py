"""Two processes on 127.0.0.1 train exactly what one process with 8 devices does.

`PROCESSES=2 DEVICES=4 launch/cpu.sh` starts two `launch/main.py
--jax_distributed` processes with 4 simulated CPU devices each (cross-process
collectives over gloo) on the 4x2 FSDP mesh: parameters and optimizer state
are sharded across the processes, each process feeds its half of every batch,
checkpoints are saved asynchronously by both. The loss trajectory, the
checkpoints and the test metrics must match the single-process reference;
metrics and results are written once. Also: the launch scripts parse and
`launch/tpu_vm.sh run` starts main.py on all workers.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import loop_testing as lt
from recjax import allocator


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  _, overrides, ref_dir, ref_results = lt.reference_run(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp("multihost") / "run")
  flags = lt.launch_cmd(dict(overrides, **{"train.async_checkpoints": True}),
                        workdir)[4:]
  env = lt.launch_env(PROCESSES="2", DEVICES="4", PORT=str(lt.free_port()),
                      PYTHON=sys.executable)
  env.pop("XLA_FLAGS")
  proc = subprocess.run(
      [os.path.join(lt.ROOT, "launch", "cpu.sh"), lt.BASE_CONFIG, workdir,
       *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, timeout=500, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return ref_dir, ref_results, workdir, proc.stdout


def test_two_processes_follow_the_single_process_trajectory(runs):
  ref_dir, _, workdir, _ = runs
  ref, got = lt.train_losses(ref_dir), lt.train_losses(workdir)
  assert sorted(got) == sorted(ref) and len(ref) >= 4
  for step in ref:     # cross-process sums may reorder float32 additions
    assert got[step] == pytest.approx(ref[step], rel=1e-5), step


def test_results_and_metrics_are_written_once_and_match(runs):
  _, ref_results, workdir, output = runs
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["devices"] == 8 and results["mesh"]["fsdp"] == 2
  # The launcher re-ran itself under tcmalloc where it is installed (--allocator=auto).
  assert results["allocator"] == (allocator.find_library("tcmalloc") or "system")
  assert results["steps"] == ref_results["steps"]
  assert results["best_step"] == ref_results["best_step"]
  for name, metrics in ref_results["metrics"].items():
    for key, value in metrics.items():
      assert results["metrics"][name][key] == pytest.approx(value, abs=1e-6)
  # Process 0 alone writes metrics and results and prints the tables.
  rows = lt.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert len(rows) == len({(r["step"], tuple(sorted(r))) for r in rows})
  assert output.count(f"wrote {workdir}/results.json") == 1


def test_multiprocess_checkpoints_restore_in_one_process(runs):
  ref_dir, _, workdir, _ = runs
  step_a, params_a = lt.latest_params(ref_dir)
  step_b, params_b = lt.latest_params(workdir)
  assert step_a == step_b
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)


def test_launch_scripts_parse_and_print_usage():
  for name in ("cpu.sh", "gpu.sh", "tpu_vm.sh"):
    path = os.path.join(lt.ROOT, "launch", name)
    subprocess.run(["bash", "-n", path], check=True)
    out = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: launch/" in out.stdout, name


def test_tpu_vm_run_starts_main_on_all_workers(tmp_path):
  fake = tmp_path / "gcloud"      # records its arguments instead of SSH
  fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$LOG"\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}",
             LOG=str(tmp_path / "log"), TPU_NAME="tpu", ZONE="zone-a",
             CONFIG="experiments/sasrec_ml100k.py", WORKDIR="gs://b/run")
  subprocess.run([os.path.join(lt.ROOT, "launch", "tpu_vm.sh"), "run",
                  "--config.train.num_epochs=2"], env=env, check=True)
  args = (tmp_path / "log").read_text().splitlines()
  assert args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in args and "--zone=zone-a" in args
  remote = [a for a in args if a.startswith("--command=")][0]
  for part in ("launch/main.py --jax_distributed",
               "--config=experiments/sasrec_ml100k.py",
               "--workdir=gs://b/run", "--config.train.num_epochs=2"):
    assert part in remote, remote
  assert ".venv/bin/python launch/main.py" in remote   # setup's Python 3.11 venv
  bad = dict(env, WORKDIR="/local/dir")     # workers cannot share it
  out = subprocess.run([os.path.join(lt.ROOT, "launch", "tpu_vm.sh"), "run"],
                       env=bad, capture_output=True, text=True)
  assert out.returncode == 2 and "gs://" in out.stderr


def test_tpu_vm_setup_installs_a_supported_python_with_the_hf_extra(tmp_path):
  """The TPU images' Python 3.10 is below jax 0.10's minimum: setup makes a uv venv."""
  fake = tmp_path / "gcloud"      # records every call's arguments
  fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$LOG"\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}",
             LOG=str(tmp_path / "log"), TPU_NAME="tpu", ZONE="zone-a")
  subprocess.run([os.path.join(lt.ROOT, "launch", "tpu_vm.sh"), "setup"], env=env,
                 check=True)
  remote = [a for a in (tmp_path / "log").read_text().splitlines()
            if a.startswith("--command=")][0]
  for part in ("uv venv --python 3.11 ~/recjax/.venv", "--python ~/recjax/.venv/bin/python",
               "'jax[tpu]>=0.10.2,<0.11'", "-e ~/recjax'[hf]'"):
    assert part in remote, remote

"""SIGTERM -> checkpoint at the current step -> exit 0 -> resume -> same result.

The run uses asynchronous checkpointing, so the test also checks that the loop
waits for a pending save before it exits.
"""

import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import loop_testing as lt
from recjax.train import preemption


def test_guard_turns_sigterm_into_a_stop_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert guard.mode == "local"
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(2) and guard.stop_step == 2
    assert guard.should_stop(3) and guard.stop_step == 2    # sticky
  assert signal.getsignal(signal.SIGTERM) is before


def test_request_stop_without_a_signal():
  with preemption.PreemptionGuard(signals=()) as guard:
    assert not guard.should_stop(7)
    guard.request_stop()
    assert guard.should_stop(8) and guard.stop_step == 8


def test_sigterm_saves_exits_cleanly_and_resumes_to_the_same_result(
    tmp_path_factory):
  _, overrides, ref_dir, ref_results = lt.reference_run(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp("preempted") / "run")
  overrides = dict(overrides, **{"train.async_checkpoints": True})
  env = lt.cached_launch_env(tmp_path_factory)
  proc = subprocess.Popen(lt.launch_cmd(overrides, workdir),
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  # SIGTERM as soon as step 10 is logged: the stop step is then (most likely)
  # not a checkpoint step, the save happens at whatever step the loop is at.
  log = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while (time.time() < deadline and proc.poll() is None
         and not (os.path.exists(log) and os.path.getsize(log))):
    time.sleep(0.02)
  assert proc.poll() is None, ("run ended before SIGTERM:\n"
                               + proc.communicate()[0][-3000:])
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  match = re.search(r"preempted: saved a checkpoint at step (\d+) of (\d+)",
                    out)
  assert match, out[-3000:]
  stop, total = int(match.group(1)), int(match.group(2))
  assert total == ref_results["steps"] and 10 <= stop < total
  assert lt.checkpoint_steps(workdir)[-1] == stop       # waited for it
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  out = lt.run_launcher(overrides, workdir, env)           # resumes at `stop`
  assert f"wrote {workdir}/results.json" in out
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["steps"] == total
  assert results["best_step"] == ref_results["best_step"]
  # Usually bitwise equal; rarely (1 in 4 runs on a loaded 2-core machine)
  # the parameters differed in the last float32 bit, hence the tolerances.
  for name, metrics in ref_results["metrics"].items():
    for key, value in metrics.items():
      assert results["metrics"][name][key] == pytest.approx(value, abs=1e-6)
  step_a, params_a = lt.latest_params(ref_dir)
  step_b, params_b = lt.latest_params(workdir)
  assert step_a == step_b == total
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-7)
  rows = lt.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert max(r["step"] for r in rows) == total

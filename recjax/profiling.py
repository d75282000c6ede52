"""Where a compiled step spends its time: per-op totals from a `jax.profiler` trace.

    times = op_times(lambda: step_once(), steps=3, log_dir="/tmp/prof")
    print(format_op_times(times))

`op_times` records a trace of `steps` calls (the caller's function must block until its
work is done), reads the Perfetto JSON that `jax.profiler` writes beside the TensorBoard
trace, and sums the duration of every complete event by name: XLA:CPU thunks (`fusion.12`,
`ynn_fusion.3`, ...) or GPU kernels, divided by `steps`. Python frames, the executor's own
wrapper events and the profiler's bookkeeping are left out. The trace stays in `log_dir` for
TensorBoard / Perfetto (one `trace_*` directory per call).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import glob
import gzip
import json
import os
import re
import tempfile

import jax

# Events that wrap others (their time is the ops' time again) or are not device work.
_WRAPPERS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "TfrtCpuExecutable",
             "PjRt", "CommonPjRt", "ParseArguments", "end: ")


def op_times(fn: Callable[[], object], steps: int, log_dir: str) -> dict[str, float]:
  """Milliseconds per call of each op of `fn`, largest first (see module docstring)."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  os.makedirs(log_dir, exist_ok=True)
  # A directory per trace: the profiler names its run by the second, so two traces in one
  # second would otherwise share (and overwrite) one file.
  run_dir = tempfile.mkdtemp(prefix="trace_", dir=log_dir)
  with jax.profiler.trace(run_dir, create_perfetto_trace=True):
    for _ in range(steps):
      fn()
  found = glob.glob(os.path.join(run_dir, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {run_dir}")
  with gzip.open(found[0]) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not str(e.get("name", "")).startswith(_WRAPPERS):
      totals[e["name"]] += float(e.get("dur", 0.0)) / 1e3 / steps
  return dict(totals.most_common())


def by_kind(times: dict[str, float]) -> dict[str, float]:
  """Sums `op_times` over op kinds: `fusion.12` and `fusion.3` both count as `fusion`."""
  kinds = collections.Counter()
  for name, ms in times.items():
    kinds[re.sub(r"[.\d]+$", "", name)] += ms
  return dict(kinds.most_common())


def format_op_times(times: dict[str, float], top: int = 25) -> str:
  """A table of the `top` ops and of all kinds, in ms per call."""
  total = sum(times.values())
  lines = [f"op time per call: {total:.1f} ms in {len(times)} ops", "top ops:"]
  lines += [f"  {ms:9.2f} ms  {100 * ms / total:5.1f}%  {name}"
            for name, ms in list(times.items())[:top]]
  lines.append("by kind:")
  lines += [f"  {ms:9.2f} ms  {100 * ms / total:5.1f}%  {kind}"
            for kind, ms in list(by_kind(times).items())[:top]]
  return "\n".join(lines)

r"""Per-device memory of the SASRec + FLAN-T5 joint train step at scale: the README table.

Runs `recjax.plan.plan` (one joint step compiled from shapes, nothing allocated) for every
(T5 preset, device count) and writes a markdown table and the JSON reports.

Command (CPU, 256 simulated devices; the script sets XLA_FLAGS itself before jax loads):
  python experiments/plan_joint_t5.py --out=/tmp/recjax/plan_joint_t5

Settings (experiments/joint_flan_t5_plan.py): T5 parameters and activations bfloat16, SASRec
and the bridge float32, Adafactor (no momentum) per tower with global-norm clipping, full
remat of every T5 block, title encodings cached (title_mode "cache"), prompt 64 tokens +
4 soft prompts, CRM window 50 with 10 targets, ML-100K's 1,682 items. Global batch 256;
gradient accumulation splits it so that one device sees at most `--max_rows` (32) rows
per micro-batch. Meshes (data, fsdp, tensor), rules "fsdp": 1 -> (1, 1, 1), 8 -> (1, 8, 1),
32 -> (1, 32, 1), 256 -> (8, 32, 1) (fsdp stops at 32: SASRec's width 64 must divide).

Depth extrapolation (`--depths=2,3`, the default): XLA's CPU compiler needs ~4-5 min for
the 12-layer flan-t5-base step on this 2-core machine and scales with depth, so the table's
models are compiled with 2 and 3 T5 layers (encoder and decoder; every other size is the
preset's) and each byte count and FLOP count is extrapolated linearly to the preset's 24
layers: v(L) = v(2) + (L - 2) (v(3) - v(2)). Every extra layer adds an identical block, so
the parameter and optimizer-state bytes are exact (checked against an `eval_shape` of the
full model); activations saved by remat grow by one block input per layer, so the temps are
linear up to the buffer assignment's packing. `--depths=full` compiles the real depth.

Hardware: 2 CPU cores, ~20 GiB RAM. Time: measured, see the log (about 1 min per compile).
Expected result: flan-t5-xl + SASRec fits one 80 GiB device; flan-t5-xxl needs sharding.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/recjax/plan_joint_t5", "Output directory.")
_MODELS = flags.DEFINE_list("models", ["flan-t5-base", "flan-t5-xl", "flan-t5-xxl"],
                            "T5 presets.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8", "32", "256"], "Device counts.")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch per step.")
_MAX_ROWS = flags.DEFINE_integer("max_rows", 32, "Rows per device per micro-batch, at most.")
_DEPTHS = flags.DEFINE_string("depths", "2,3", "'full' or two T5 depths to extrapolate from.")

MESHES = {1: (1, 1, 1), 8: (1, 8, 1), 32: (1, 32, 1), 256: (8, 32, 1)}


def _config(preset: str, num_layers: int | None):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import joint_flan_t5_plan  # noqa: PLC0415 (beside this script)
  config = joint_flan_t5_plan.get_config(preset)
  if num_layers is not None:
    config.llm.num_layers = num_layers
    config.bridge.align_pairs = ((1, 0), (2, 1))
  return config


def _extrapolate(a: dict, b: dict, da: int, db: int, depth: int) -> dict:
  """Linear in depth, for every number of the report (booleans recomputed by the caller)."""
  def lin(x, y):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
      return x
    v = x + (depth - da) * (y - x) / (db - da)
    return int(round(v)) if isinstance(x, int) else v
  out = {}
  for k, v in a.items():
    out[k] = _extrapolate(v, b[k], da, db, depth) if isinstance(v, dict) else lin(v, b[k])
  return out


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=256")
  import jax  # noqa: PLC0415 (after XLA_FLAGS)
  from recjax import plan as plan_lib  # noqa: PLC0415
  from recjax.models.t5 import PRESETS  # noqa: PLC0415
  from recjax.train.joint_task import build_joint_task  # noqa: PLC0415

  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "plans.json")
  reports = []
  if os.path.exists(path):   # resume: keep the points already planned
    with open(path) as f:
      reports = json.load(f)
  done = {(r["llm_preset"], r["devices"]) for r in reports}
  full_params = {}
  t_start = time.perf_counter()
  # Device-major, so an interrupted run still covers every model on the small meshes.
  for n in (int(d) for d in _DEVICES.value):
    for preset in _MODELS.value:
      if (preset, n) in done:
        continue
      depth = PRESETS[preset]["num_layers"]
      full = _config(preset, None)
      if preset not in full_params:
        abstract = jax.eval_shape(build_joint_task(full, full.plan.num_items).init,
                                  jax.random.key(0))
        full_params[preset] = sum(x.size for x in jax.tree.leaves(abstract))
      mesh = MESHES[n]
      shards = mesh[0] * mesh[1]
      accum = max(1, _BATCH.value // (_MAX_ROWS.value * shards))
      t0 = time.perf_counter()
      if _DEPTHS.value == "full":
        report = plan_lib.plan(full, mesh, _BATCH.value, grad_accum=accum)
        report["depth_mode"] = "compiled"
      else:
        da, db = (int(x) for x in _DEPTHS.value.split(","))
        ra = plan_lib.plan(_config(preset, da), mesh, _BATCH.value, grad_accum=accum)
        rb = plan_lib.plan(_config(preset, db), mesh, _BATCH.value, grad_accum=accum)
        report = _extrapolate(ra, rb, da, db, depth)
        report["lower_seconds"] = ra["lower_seconds"] + rb["lower_seconds"]
        report["compile_seconds"] = ra["compile_seconds"] + rb["compile_seconds"]
        report["depth_mode"] = f"extrapolated from {da} and {db} layers"
        total = report["bytes_per_device"]["total"]
        report["fits"] = {f"{g}GiB": bool(total <= g * plan_lib.GiB)
                          for g in plan_lib.BUDGETS_GIB}
      report["llm_preset"] = preset
      if report["params"]["total"] != full_params[preset]:
        raise AssertionError(f"{preset}: plan counts {report['params']['total']} "
                             f"parameters, eval_shape {full_params[preset]}")
      reports.append(plan_lib.to_jsonable(report))
      print(plan_lib.format_plan(report), f"\n[{time.perf_counter() - t0:.0f} s]\n",
            flush=True)
      with open(path, "w") as f:
        json.dump(reports, f, indent=2)
      order = {m: i for i, m in enumerate(_MODELS.value)}
      table = plan_lib.markdown_table(sorted(
          reports, key=lambda r: (order.get(r["llm_preset"], 99), r["devices"])))
      with open(os.path.join(_OUT.value, "table.md"), "w") as f:
        f.write(table + "\n")
  print(table)
  print(f"total {time.perf_counter() - t_start:.0f} s; wrote {_OUT.value}/plans.json, "
        "table.md")


if __name__ == "__main__":
  app.run(main)

"""`--mode=plan`: memory, parameters and FLOPs of one train step, from shapes alone.

`plan(config, mesh_shape, batch_size)` builds the train step the config describes (the
joint SASRec + T5 step when the config has `crm`/`llm` sections, else the SASRec step),
lowers it for a (data, fsdp, tensor) mesh with ABSTRACT inputs only (the state from
`jax.eval_shape` with shardings from the logical rules, the batch as
`jax.ShapeDtypeStruct`s carrying the batch sharding), compiles it, and reports:

  params            parameter count, total and per tower ("crm", "llm", "bridge"; "sasrec")
  bytes_per_device  from `compiled.memory_analysis()`: arguments, outputs, temp,
                    generated_code, alias, and total = arguments + outputs + temp - alias
                    (the donated state aliases its outputs); plus params, opt_state (the
                    shards one device holds, from the shardings)
  opt_state_bytes   optimizer state over all devices
  flops             `compiled.cost_analysis()["flops"]` (XLA's count for one device's
                    program; a `scan` body, e.g. gradient accumulation, is counted ONCE, not
                    times its trip count), and `analytic_6nt`: 6 x (matmul parameters x the
                    tokens through them) + 6 x the catalogue-scoring matmuls, for the whole
                    global batch
  fits              {"16GiB": bool, "32GiB", "80GiB", "95GiB"}: total <= budget

Nothing is allocated on any device: compiling for a mesh needs only that many devices to
exist, so simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set
before jax is imported) plan a 256-device mesh on a laptop. The numbers come from the XLA
compiler of the platform that compiles (on the CPU, bf16 arithmetic may be upcast and the
buffer assignment differs from the GPU/TPU compilers): an estimate of the order, not a
promise.

Config keys (`config.plan`, all optional but `num_items` when no data should be read):
  num_items    catalogue size. Without it the dataset named by `config.data` is loaded
               (`recjax.train.loop.load_data`) to count the items.
  num_targets  CRM targets per row S (default: `config.input.stride` for SASRec, else
               `crm.max_len`).
  grad_accum   micro-batches per step (default `config.train.grad_accum`, else 1).
The batch shapes come from the model config (`crm.max_len` / `model.max_len`) and, for the
joint model, `data.prompt_len` and `data.title_len`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recjax import sharding as shd

GiB = 2 ** 30
# The plan never runs the program: skip the CPU backend's expensive codegen passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}
BUDGETS_GIB = (16, 32, 80, 95)


def _struct(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _num_items(config) -> int:
  plan_cfg = config.get("plan", None)
  if plan_cfg is not None and plan_cfg.get("num_items", None):
    return int(plan_cfg.num_items)
  from recjax.train import loop  # reads the dataset: only without plan.num_items
  return loop.load_data(config.data).num_items


def _plan_get(config, key, default):
  plan_cfg = config.get("plan", None)
  if plan_cfg is not None and plan_cfg.get(key, None) is not None:
    return plan_cfg.get(key)
  return default


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _bytes_per_device(tree) -> int:
  """Bytes of the shards one device holds (the largest shard per leaf)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


def _matmul_params(tree) -> int:
  """Parameters of >= 2-D kernels that are not embedding tables (lookups are not matmuls)
  or biases (a fused projection has a 2-D or 3-D bias)."""
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = jax.tree_util.keystr(path)
    if (len(x.shape) >= 2 and "embedding" not in name and "memory" not in name
        and "bias" not in name):
      total += math.prod(x.shape)
  return total


def _sasrec_matmul_tokens(params, cfg, b: int, l: int, s: int) -> int:
  """Sum over SASRec's matmul kernels of parameters x rows they run on (x 6 = train flops).

  The last block runs its output projection and feed-forward at the S scored positions only
  (SASRec's `num_outputs`); its fused q/k/v projection and the earlier blocks at all L.
  """
  if s >= l or cfg.num_blocks == 0:
    return _matmul_params(params) * b * l
  last = params[f"block_{cfg.num_blocks - 1}"]
  at_s = _matmul_params(last) - _matmul_params(last["attention"]["qkv"])
  return (_matmul_params(params) - at_s) * b * l + at_s * b * s


def _joint_setup(config, num_items: int, batch_size: int):
  from recjax.train import joint_step
  from recjax.train.joint_task import build_joint_task, stage_controls
  task = build_joint_task(config, num_items)
  cfg = task.cfg
  num_steps = int(config.get("train", {}).get("num_steps", 1000))
  tx = joint_step.make_joint_optimizer(config.optim, num_steps)
  b, l = batch_size, cfg.crm.max_len
  s = int(_plan_get(config, "num_targets", l))
  text = config.prompt if "prompt" in config else config.data   # joint_loop's keys
  t, tt = int(text.prompt_len), int(text.title_len)
  batch = {"inputs": ((b, l), jnp.int32), "labels": ((b, s), jnp.int32),
           "mask": ((b, s), bool), "llm_input_ids": ((b, t), jnp.int32),
           "llm_input_mask": ((b, t), bool), "llm_item_ids": ((b, t), jnp.int32),
           "user_ids": ((b,), jnp.int32), "target": ((b,), jnp.int32),
           "target_mask": ((b,), bool)}
  n = cfg.num_rows
  if cfg.title_mode == "cache":
    catalogue = {"title_table": _struct((n, cfg.llm.d_model), jnp.float32)}
  else:
    catalogue = {"title_ids": _struct((n, tt), jnp.int32),
                 "title_mask": _struct((n, tt), bool)}
  abstract_params = jax.eval_shape(task.init, jax.random.key(0))
  controls = jax.eval_shape(lambda: stage_controls(
      {"crm": 1.0, "llm": 1.0, "kl": 1.0, "layer": 1.0},
      {"crm": True, "llm": True, "bridge": True}, abstract_params))
  controls["catalogue"] = catalogue

  def make_step(state_sharding, mesh, grad_accum, compiler_options):
    return joint_step.make_joint_train_step(task.loss, tx, state_sharding, mesh,
                                            grad_accum=grad_accum,
                                            compiler_options=compiler_options,
                                            norms_fn=task.normalizers)

  def analytic(params):
    k = cfg.bridge.num_soft_prompts if cfg.bridge.crm_to_llm else 0
    llm = params["llm"]
    enc, dec = _matmul_params(llm["encoder"]), _matmul_params(llm["decoder"])
    crm_s = s
    if cfg.bridge.align_crm_pool == "mean" and any(
        block == cfg.crm.num_blocks - 1 for _, block in cfg.bridge.align_pairs):
      crm_s = l                        # the alignment mean-pools the whole last block
    crm = _sasrec_matmul_tokens(params["crm"], cfg.crm, b, l, crm_s)
    flops = 6 * (crm + enc * b * (t + k) + dec * b)
    flops += 6 * b * (s * cfg.crm.hidden + cfg.llm.d_model) * n   # item scoring
    if cfg.bridge.llm_to_crm and cfg.title_mode == "step":
      flops += 6 * enc * n * tt                                     # title encoder
    return flops

  extra = (controls,)
  return task, tx, batch, extra, make_step, analytic, "joint"


def _sasrec_setup(config, num_items: int, batch_size: int):
  from recjax.train import loop
  from recjax.train import optimizer as optim_lib
  from recjax.train import step as step_lib
  task = loop.build_task(config, num_items)
  num_steps = int(config.get("train", {}).get("num_steps", 1000) or 1000)
  tx = optim_lib.make_optimizer(config.optim, num_steps)
  b, l = batch_size, task.model_cfg.max_len
  stride = config.get("input", {}).get("stride", l)
  s = int(_plan_get(config, "num_targets", stride))
  batch = {"inputs": ((b, l), jnp.int32), "labels": ((b, s), jnp.int32),
           "mask": ((b, s), bool)}
  ema = config.optim.get("ema_decay", 0.0)

  def make_step(state_sharding, mesh, grad_accum, compiler_options):
    return step_lib.make_train_step(task.loss, tx, state_sharding, mesh, ema_decay=ema,
                                    grad_accum=grad_accum,
                                    compiler_options=compiler_options)

  def analytic(params):
    return 6 * (_sasrec_matmul_tokens(params, task.model_cfg, b, l, s)
                + b * s * (num_items + 1) * task.model_cfg.hidden)

  return task, tx, batch, (), make_step, analytic, "sasrec"


def plan(config, mesh_shape: Sequence[int], batch_size: int, *,
         grad_accum: int | None = None, rules: str | None = None,
         devices: Sequence[jax.Device] | None = None,
         compiler_options: dict | None = FAST_COMPILE) -> dict[str, Any]:
  """Compiles the config's train step for `mesh_shape` from shapes; returns the report.

  mesh_shape: (data, fsdp, tensor) sizes (-1 allowed once); needs that many devices
    (real or simulated) but allocates nothing on them.
  batch_size: the GLOBAL batch B of one step (rows; split over grad_accum micro-batches).
  grad_accum, rules: override `config.plan.grad_accum` / `config.mesh.rules`.
  compiler_options: for the step's `jax.jit`; the default skips the backend's (LLVM)
    optimisations, which do not change the buffer assignment that memory_analysis reads
    but dominate CPU compile time (the program is never run).
  See the module docstring for the keys of the returned dict.
  """
  devices = list(jax.devices() if devices is None else devices)
  size = math.prod(s for s in mesh_shape if s != -1)
  if -1 not in mesh_shape and size > len(devices):
    raise ValueError(
        f"plan mesh {tuple(mesh_shape)} needs {size} devices, {len(devices)} exist; "
        f"simulate them with XLA_FLAGS=--xla_force_host_platform_device_count={size} "
        "(set before jax is imported)")
  if -1 not in mesh_shape:
    devices = devices[:size]
  mesh = shd.make_mesh(tuple(mesh_shape), devices=devices)
  rules = rules or config.mesh.rules
  if grad_accum is None:
    grad_accum = int(_plan_get(config, "grad_accum",
                               config.get("train", {}).get("grad_accum", 1)))
  num_items = _num_items(config)
  setup = _joint_setup if "llm" in config else _sasrec_setup
  task, tx, batch_spec, extra, make_step, analytic, kind = setup(
      config, num_items, batch_size)
  ema = float(config.optim.get("ema_decay", 0.0)) > 0

  from recjax.train import state as state_lib
  abstract, state_sharding = state_lib.abstract_train_state(task.init, tx, mesh, rules,
                                                            ema=ema)
  batch_sharding = shd.batch_sharding(mesh)
  batch = {k: _struct(shape, dtype, batch_sharding)
           for k, (shape, dtype) in batch_spec.items()}
  rng = jax.eval_shape(jax.random.key, 0)
  step = make_step(state_sharding, mesh, grad_accum, compiler_options)

  t0 = time.perf_counter()
  lowered = step.lower(abstract, batch, rng, *extra)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  mem = compiled.memory_analysis()
  args, outs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  temp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
  total = args + outs + temp - alias
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  params = abstract.params
  towers = ({t: _count(params[t]) for t in params} if kind == "joint"
            else {"sasrec": _count(params)})
  shards = shd.num_batch_shards(mesh)
  return {
      "kind": kind,
      "llm_preset": config.llm.get("preset") if kind == "joint" else None,
      "mesh": dict(mesh.shape),
      "devices": int(mesh.size),
      "rules": rules if isinstance(rules, str) else str(rules),
      "batch_size": int(batch_size),
      "grad_accum": int(grad_accum),
      "rows_per_device_per_micro_batch": batch_size / grad_accum / shards,
      "num_items": int(num_items),
      "optimizer": config.optim.get("name", "adamw"),
      "params": {"total": _count(params), **towers},
      "bytes_per_device": {
          "params": _bytes_per_device(params),
          "opt_state": _bytes_per_device(abstract.opt_state),
          "arguments": args, "outputs": outs, "temp": temp,
          "generated_code": int(mem.generated_code_size_in_bytes), "alias": alias,
          "total": total,
      },
      "param_bytes": _bytes(params),
      "opt_state_bytes": _bytes(abstract.opt_state),
      "flops": {"xla_per_device": float(cost.get("flops", float("nan"))),
                "analytic_6nt": float(analytic(params))},
      "fits": {f"{g}GiB": bool(total <= g * GiB) for g in BUDGETS_GIB},
      "lower_seconds": round(t1 - t0, 2),
      "compile_seconds": round(t2 - t1, 2),
  }


def format_plan(report: dict) -> str:
  """A readable table of one plan."""
  b = report["bytes_per_device"]
  gib = lambda x: f"{x / GiB:9.3f} GiB"
  lines = [
      f"plan: {report['kind']}"
      + (f" ({report['llm_preset']})" if report.get("llm_preset") else "")
      + f", mesh {report['mesh']} ({report['devices']} devices, rules "
        f"{report['rules']}), batch {report['batch_size']} x grad_accum "
        f"{report['grad_accum']} ({report['rows_per_device_per_micro_batch']:g} rows/device"
        f"/micro-batch), optimizer {report['optimizer']}",
      "parameters: " + ", ".join(f"{k} {v:,}" for k, v in report["params"].items()),
      f"optimizer state (all devices): {report['opt_state_bytes'] / GiB:.3f} GiB",
      "per device:",
  ]
  for key in ("params", "opt_state", "arguments", "outputs", "temp", "generated_code",
              "alias", "total"):
    lines.append(f"  {key:<15}{gib(b[key])}")
  f = report["flops"]
  lines.append(f"flops/step: XLA {f['xla_per_device']:.3e} per device "
               f"(scan bodies once), analytic 6NT {f['analytic_6nt']:.3e} (global)")
  lines.append("fits: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                    for k, v in report["fits"].items()))
  lines.append(f"lower {report['lower_seconds']} s, compile {report['compile_seconds']} s")
  return "\n".join(lines)


def markdown_table(reports: Sequence[dict]) -> str:
  """One row per plan: model, devices, mesh, micro-batching, memory, fits."""
  head = ("| model | params | devices | mesh (data, fsdp, tensor) | batch x accum | "
          "GiB/device (args + out + temp - alias) | 16 | 32 | 80 | 95 | compile s |")
  rows = [head, "|" + "---|" * 11]
  for r in reports:
    mesh = r["mesh"]
    fits = ["yes" if r["fits"][f"{g}GiB"] else "no" for g in BUDGETS_GIB]
    rows.append(
        f"| {r.get('llm_preset') or r['kind']} | {r['params']['total'] / 1e9:.2f}B | "
        f"{r['devices']} | ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | "
        f"{r['batch_size']} x {r['grad_accum']} | "
        f"{r['bytes_per_device']['total'] / GiB:.2f} | " + " | ".join(fits)
        + f" | {r['compile_seconds']:.0f} |")
  return "\n".join(rows)


def to_jsonable(report: dict) -> dict:
  return jax.tree.map(lambda x: x.item() if isinstance(x, np.generic) else x, report)

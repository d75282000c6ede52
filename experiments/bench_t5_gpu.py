r"""FLAN-T5 train-step time and MFU on one GPU, bf16: recjax vs transformers' PyTorch T5.

Every case trains flan-t5-base (or --model) from the same random weights (the PyTorch model
is converted with `recjax.convert`) on one random padded batch: AdamW, cross-entropy over the
target tokens, float32 parameters and optimizer state, bfloat16 activations (recjax:
`T5Config(dtype=bfloat16)`; PyTorch: `torch.autocast(bfloat16)`, fused AdamW, eager).
Each case is compiled, warmed up, then timed as `--rounds` rounds of `--steps` steps with a
device sync at the end of each round; the table shows the median round's time per step.

MFU = `recjax.models.t5.train_flops` (3 x the forward matmuls, attention included; checked
against XLA's count in tests/test_t5.py) / step time / peak, with peak = the datasheet's dense
bf16 rate (`--peak_tflops`, 989 for an H100/H200 SXM); the table also shows the achieved
fraction of a bf16 8192^3 matmul measured in the same run (`ceiling`).

Cases (name: batch x source x target, options):
  base        64 x 512 x 128, dropout 0.1, attention "einsum" (the default model)
  issue       8 x 128 x 32 (the CPU benchmark's shape), dropout 0.1
  large_batch 128 x 512 x 128, dropout 0.1
  nodrop      64 x 512 x 128, dropout 0
  cudnn       64 x 512 x 128, dropout 0, attention "cudnn" (fused flash attention)
  remat       128 x 512 x 128, dropout 0.1, remat_policy "dots"

Run (one NVIDIA GPU; ~5 minutes):
  python experiments/bench_t5_gpu.py --out /tmp/bench_t5_gpu.json
Where the time goes (per-op table printed and saved in the JSON; traces for TensorBoard):
  python experiments/bench_t5_gpu.py --cases base,cudnn --torch_cases '' \
      --profile_cases base,cudnn --out $OUT/prof.json
Hardware and expected result: see README "FLAN-T5 on a GPU" (H200, session 6).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_t5_step import build_torch, make_batch, make_train_step  # noqa: E402

CASES = {
    "base": dict(batch=64, source_len=512, target_len=128),
    "issue": dict(batch=8, source_len=128, target_len=32),
    "large_batch": dict(batch=128, source_len=512, target_len=128),
    "nodrop": dict(batch=64, source_len=512, target_len=128, dropout_rate=0.0),
    "cudnn": dict(batch=64, source_len=512, target_len=128, dropout_rate=0.0,
                  attention_impl="cudnn"),
    "remat": dict(batch=128, source_len=512, target_len=128, remat_policy="dots"),
}


def timed_rounds(step, sync, steps: int, rounds: int, warmup: int) -> list[float]:
  """Seconds per step of each round (`steps` calls, then one device sync)."""
  for _ in range(warmup):
    step()
  sync()
  out = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    sync()
    out.append((time.perf_counter() - t0) / steps)
  return out


def matmul_ceiling_tflops(n: int = 8192) -> float:
  """bf16 [n, n] @ [n, n] through XLA: the achievable matmul rate of this GPU."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  holder = {}
  times = timed_rounds(lambda: holder.update(c=f(a, b)),
                       lambda: holder["c"].block_until_ready(), 10, 5, 3)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def run_jax(params, cfg, batch, args, profile_dir: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from recjax.models.t5 import T5
  module = T5(cfg)
  tx = optax.adamw(args.learning_rate, weight_decay=0.01)
  params = jax.tree.map(jnp.asarray, params)
  state = (params, tx.init(params), jnp.zeros((), jnp.int32))
  batch = jax.tree.map(jnp.asarray, batch)

  step = make_train_step(module, tx)

  rng = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  holder = {"state": state}

  def one():
    holder["state"], holder["loss"] = compiled(holder["state"], batch, rng)

  times = timed_rounds(one, lambda: holder["loss"].block_until_ready(), args.steps,
                       args.rounds, args.warmup)
  profile = None
  if profile_dir:   # per-op times of 3 more steps (recjax.profiling)
    from recjax import profiling
    ops = profiling.op_times(
        lambda: (one(), holder["loss"].block_until_ready()), steps=3, log_dir=profile_dir)
    print(profiling.format_op_times(ops, top=30), flush=True)
    profile = dict(top_ops_ms=dict(list(ops.items())[:60]), by_kind_ms=profiling.by_kind(ops))
  # Arguments (params, optimizer state, batch) + XLA's temporaries of the step.
  mem_bytes = sum(getattr(mem, f, 0) for f in ("argument_size_in_bytes", "temp_size_in_bytes"))
  out = dict(step_s=statistics.median(times), rounds_s=times, compile_s=compile_s,
             loss=float(holder["loss"]), xla_flops=float(cost.get("flops", 0.0)),
             mem_gib=mem_bytes / 2 ** 30, cudnn_attention="__cudnn$fmha" in hlo,
             profile=profile)
  del holder, state, compiled
  return out


def run_torch(torch_model, cfg, batch, args) -> dict:
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: --smoke only
  sync = torch.cuda.synchronize if dev == "cuda" else lambda: None
  model = torch_model.to(dev).train()
  model.load_state_dict(torch_model.initial_state)    # every case from the same weights
  model.config.dropout_rate = cfg.dropout_rate
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = cfg.dropout_rate
    elif isinstance(getattr(m, "dropout", None), float):   # T5Attention's weight dropout
      m.dropout = cfg.dropout_rate
  opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01,
                          fused=dev == "cuda")
  b = {k: torch.tensor(v, dtype=torch.long, device=dev) for k, v in batch.items()}
  labels = b["targets"].masked_fill(b["target_mask"] == 0, -100)
  holder = {}

  def one():
    with torch.autocast(dev, dtype=torch.bfloat16):
      out = model(input_ids=b["inputs"], attention_mask=b["input_mask"],
                  decoder_input_ids=b["decoder_inputs"],
                  decoder_attention_mask=b["target_mask"], labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    holder["loss"] = out.loss

  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = timed_rounds(one, sync, args.steps, args.rounds, args.warmup)
  out = dict(step_s=statistics.median(times), rounds_s=times, loss=float(holder["loss"]),
             mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else 0.0)
  del opt, holder
  model.to("cpu")
  if dev == "cuda":
    torch.cuda.empty_cache()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--model", default="flan-t5-base")
  parser.add_argument("--cases", default="base,issue,cudnn,nodrop,large_batch,remat")
  parser.add_argument("--torch_cases", default="base,issue",
                      help="cases also run with transformers' PyTorch T5 ('' for none)")
  parser.add_argument("--profile_cases", default="",
                      help="cases whose recjax step is also traced (jax.profiler) and "
                           "summarised per op; traces under <out>.profile/<case>")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--learning_rate", type=float, default=1e-4)
  parser.add_argument("--peak_tflops", type=float, default=989.0,
                      help="datasheet dense bf16 peak of the GPU (H100/H200 SXM: 989)")
  parser.add_argument("--budget_s", type=float, default=460.0,
                      help="skip the remaining cases once this much time has passed")
  parser.add_argument("--smoke", action="store_true",
                      help="every case at 2 x 32 x 8, 2 steps x 2 rounds (a CPU check of "
                           "the script, no meaningful figures)")
  parser.add_argument("--out", default="/tmp/bench_t5_gpu.json")
  args = parser.parse_args()
  if args.smoke:
    for spec in CASES.values():
      spec.update(batch=2, source_len=32, target_len=8)
    args.steps, args.rounds, args.warmup = 2, 2, 1
  start = time.perf_counter()

  import jax
  import jax.numpy as jnp
  from recjax.convert import load_t5_from_hf
  from recjax.models.t5 import T5Config, count_params, train_flops

  results = dict(meta=dict(vars(args), devices=[str(d) for d in jax.devices()],
                           device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                           python=sys.version.split()[0], machine=platform.machine()),
                 cases={})

  def save():
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)

  try:
    import flax
    results["meta"]["flax"] = flax.__version__
    results["meta"]["matmul_ceiling_tflops"] = matmul_ceiling_tflops(512 if args.smoke else 8192)
  except Exception:  # noqa: BLE001 -- report and go on
    traceback.print_exc()
  ceiling = results["meta"].get("matmul_ceiling_tflops", float("nan"))
  print(f"devices {results['meta']['devices']} jax {jax.__version__}; bf16 8192^3 matmul "
        f"{ceiling:.0f} TFLOP/s", flush=True)

  base_cfg = T5Config.preset(args.model)
  torch_model = build_torch(base_cfg)
  import copy
  import torch
  torch_model.initial_state = copy.deepcopy(torch_model.state_dict())
  results["meta"]["torch"] = torch.__version__
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp)
    _, params = load_t5_from_hf(tmp)
  results["meta"]["params"] = count_params(params)
  torch_cases = [c for c in args.torch_cases.split(",") if c]

  for name in args.cases.split(","):
    spec = dict(CASES[name])
    shape = {k: spec.pop(k) for k in ("batch", "source_len", "target_len")}
    cfg = base_cfg.replace(dtype=jnp.bfloat16, **spec)
    batch = make_batch(cfg, shape["batch"], shape["source_len"], shape["target_len"])
    flops = train_flops(cfg, **shape)
    entry = results["cases"].setdefault(name, dict(shape, **spec, model_flops=flops))
    for backend in (["pytorch"] if name in torch_cases else []) + ["recjax"]:
      if time.perf_counter() - start > args.budget_s:
        print(f"skipped {name}/{backend}: budget", flush=True)
        continue
      try:
        r = (run_torch(torch_model, cfg, batch, args) if backend == "pytorch"
             else run_jax(params, cfg, batch, args,
                          profile_dir=(f"{args.out}.profile/{name}"
                                       if name in args.profile_cases.split(",") else None)))
      except Exception as e:  # noqa: BLE001 -- report and go on
        traceback.print_exc()
        entry[backend] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        save()
        continue
      r["tflops"] = flops / r["step_s"] / 1e12
      r["mfu"] = r["tflops"] / args.peak_tflops
      r["of_ceiling"] = r["tflops"] / ceiling if ceiling == ceiling else None
      entry[backend] = r
      save()
      print(f"{name:<12}{backend:<8} {shape['batch']}x{shape['source_len']}x"
            f"{shape['target_len']} {spec} step {1e3 * r['step_s']:8.2f} ms  "
            f"{r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  "
            f"({100 * (r['of_ceiling'] or 0):5.1f}% of the matmul ceiling)  loss {r['loss']:.3f}  "
            f"mem {r['mem_gib']:.1f} GiB" +
            (f"  compile {r['compile_s']:.0f} s  cudnn {r['cudnn_attention']}"
             if backend == "recjax" else ""), flush=True)
  results["meta"]["wall_s"] = time.perf_counter() - start
  save()
  print(f"wrote {args.out} ({results['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()

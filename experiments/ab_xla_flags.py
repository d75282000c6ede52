r"""A/B of XLA flag sets on the T5 CPU train step, one process per setting, with the program's
fingerprint, so a "faster" flag that compiles to the very same program is caught.

XLA reads `XLA_FLAGS` once per process, so every (round, setting) pair runs in its own child
process: build the step of `bench_t5_step.py` (float32, AdamW, dropout 0.1, batch 8 x 128 x
32), compile, `--warmup` steps, then the median of `--steps` timed steps and the CPU seconds
per step. Settings alternate within each round (the order rotates from round to round), so the
VM's drift hits all alike. Each child also hashes the optimised HLO (source locations and
metadata stripped): a setting with the reference's hash left the HLO unchanged, so for flags
that act on HLO (fusion and library choices) its time difference is noise; flags that act only
in code generation (LLVM options, fast math, vector width) change the executable but not this
hash. The children's XLA_FLAGS is the setting alone (the caller's XLA_FLAGS is replaced).

Run (CPU, quiet machine; ~1 min per child at flan-t5-small):
  python experiments/ab_xla_flags.py --shape flan-t5-small --rounds 3 \
      --setting= --setting=--xla_cpu_experimental_onednn_fusion_type=dot \
      "--setting=--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot" \
      --setting=--xla_cpu_experimental_ynn_fusion_type=
(`--setting=VALUE` with the `=`: a value starting with `--` is otherwise read as a flag.)
Expected (session 7, AMD EPYC VM, jax 0.10.2): either oneDNN flag alone reports the default's
fingerprint (it takes both `--xla_cpu_use_onednn=true` and `..._onednn_fusion_type=dot` to route
dots to oneDNN) and still differs in time by up to ~25% from round to round; both together make
the child fail ("partition compile failed", then SIGILL; seen with `--shape tiny`) on the T5
step here, though a single 2-D matmul runs; an empty YNN fusion type compiles a different program (plain Eigen dots).
A failed setting is reported and the others still run (exit status 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recjax import allocator  # noqa: E402

if __name__ == "__main__":  # before any work: may re-run this command under tcmalloc
  allocator.reexec_from_argv()


def hlo_fingerprint(text: str) -> str:
  """sha256 (12 hex) of compiled HLO text without metadata / source locations."""
  text = re.sub(r"(^|\n)(FileNames|FunctionNames|FileLocations|StackFrames)\n.*?(?=\n\n|\Z)",
                "", text, flags=re.S)
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  text = re.sub(r"stack_frame_id=\d+", "", text)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def child(args) -> dict:
  """Times the step in this process (XLA_FLAGS as inherited); returns a result dict."""
  import resource

  import jax
  import jax.numpy as jnp
  import optax

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from bench_t5_step import SHAPES, make_batch, make_train_step  # noqa: PLC0415
  from recjax.models.t5 import T5, T5Config

  cfg = T5Config(**SHAPES[args.shape], dropout_rate=0.1)
  module = T5(cfg)
  batch = jax.tree.map(jnp.asarray, make_batch(cfg, 8, 128, 32))
  params = jax.jit(module.init)(jax.random.key(0), batch["inputs"],
                                batch["decoder_inputs"])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  state = (params, tx.init(params), jnp.zeros((), jnp.int32))
  rng = jax.random.key(0, impl="rbg")
  t0 = time.perf_counter()
  step = jax.jit(make_train_step(module, tx), donate_argnums=0).lower(
      state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  hlo = step.as_text()
  for _ in range(args.warmup):
    state, loss = step(state, batch, rng)
    loss.block_until_ready()
  times = []
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, loss = step(state, batch, rng)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / args.steps
  return {"median_s": statistics.median(times), "min_s": min(times), "cpu_s": cpu,
          "compile_s": compile_s, "hlo": hlo_fingerprint(hlo),
          "fusion_kinds": sorted(set(re.findall(r'"kind":"(\w+)"', hlo))),
          "loss": float(loss)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--allocator", default="auto", help=allocator.HELP)
  parser.add_argument("--shape", default="flan-t5-small")
  parser.add_argument("--setting", action="append", default=None,
                      help="an XLA_FLAGS value, as --setting=VALUE (empty = default); repeat per setting")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args)), flush=True)
    return
  settings = args.setting if args.setting is not None else [
      "", "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"]
  results: list[list[dict]] = [[] for _ in settings]      # by index: A/A runs stay apart
  errors: list[str] = []
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--allocator", args.allocator,
         "--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup)]
  for r in range(args.rounds):
    for j in range(len(settings)):
      i = (j + r) % len(settings)                           # rotate the order per round
      s = settings[i]
      env = dict(os.environ, XLA_FLAGS=s)
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
      if proc.returncode or not line:
        errors.append(f"round {r} setting {i} {s!r}: rc {proc.returncode}\n{proc.stderr[-2000:]}")
        print(errors[-1], flush=True)
        continue
      res = json.loads(line[0][len("RESULT "):])
      results[i].append(res)
      print(f"round {r}  [{i}] {s or '(default)':<60} {res['median_s']:.3f} s  "
            f"cpu {res['cpu_s']:.2f} s  hlo {res['hlo']}", flush=True)
  base = {x["hlo"] for x in results[0]}
  print(f"\n{args.shape}: median step over rounds (setting [0] = reference)")
  for i, s in enumerate(settings):
    if not results[i]:
      print(f"  [{i}] {s or '(default)':<60} failed")
      continue
    med = statistics.median(x["median_s"] for x in results[i])
    hashes = {x["hlo"] for x in results[i]}
    same = "same HLO as the reference" if i and hashes == base else ""
    print(f"  [{i}] {s or '(default)':<60} {med:.3f} s  hlo {','.join(sorted(hashes))}  "
          f"kinds {results[i][0]['fusion_kinds']}  {same}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"shape": args.shape, "settings": settings, "results": results,
                 "errors": errors, "allocator": allocator.loaded()}, f, indent=2)
    print(f"wrote {args.out}")
  if errors:
    sys.exit(1)

if __name__ == "__main__":
  main()

r"""SASRec train-step time: the shipped step vs the same step computing every position.

The loss of `recjax.train.sequential.SequentialTask` scores only the last `stride` positions
of each window, so SASRec's last block attends from those positions only and runs its output
projection and feed-forward at them (`SASRec(..., num_outputs=S)`). This benchmark times, on the same
MovieLens-100K batches (experiments/sasrec_ml100k.py: batch 32 windows of 50, loss on the
last 10 positions):
  shipped      `recjax.train.step.make_train_step(task.loss, ...)`, as `launch/main.py` runs;
  all_outputs  the same step with the last block at every position, then sliced (the
               values are the same; tests/test_sasrec.py pins that down).
Both are compiled once, warmed up, then timed over `--steps` steps in interleaved rounds
(noise hits both alike); the table shows the median and XLA's flop count of each step.

Run (CPU, quiet machine):
  python experiments/bench_sasrec_step.py --steps 10 --rounds 21
Hardware: 2-core CPU. Time: ~1 minute.
Expected (session 5, 2-core Sapphire Rapids VM, quiet): shipped 23.6 ms, 1.01 GFLOP;
all_outputs 30.3 ms, 1.37 GFLOP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recjax import allocator  # noqa: E402

if __name__ == "__main__":  # before any work: may re-run this command under tcmalloc
  allocator.reexec_from_argv()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from recjax import losses  # noqa: E402
from recjax import sharding as shd  # noqa: E402
from recjax.configs import load_config_file  # noqa: E402
from recjax.data import pipeline  # noqa: E402
from recjax.models.sasrec import SASRec  # noqa: E402
from recjax.train import loop  # noqa: E402
from recjax.train import optimizer as optim_lib  # noqa: E402
from recjax.train import state as state_lib  # noqa: E402
from recjax.train import step as step_lib  # noqa: E402


def all_outputs_loss(task):
  """SequentialTask.loss (CE) with the last block at every position, then sliced."""
  def loss(params, batch, rng):
    dropout_rng, _ = jax.random.split(rng)
    s = batch["labels"].shape[1]
    hidden = task.model.apply({"params": params}, batch["inputs"], deterministic=False,
                              rngs={"dropout": dropout_rng})[:, -s:]
    logits = task.model.apply({"params": params}, hidden, method=SASRec.score,
                              history_ids=batch["inputs"])
    total, count = losses.softmax_cross_entropy(logits, batch["labels"], batch["mask"])
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"loss_ce": loss, "num_targets": count}
  return loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--allocator", default="auto", help=allocator.HELP)
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments",
                                                       "sasrec_ml100k.py"))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=11)
  parser.add_argument("--out", default="/tmp/recjax/bench_sasrec_step.json")
  args = parser.parse_args()
  print(f"allocator: {allocator.loaded()}", flush=True)
  config = load_config_file(args.config)
  if config.loss.type != "ce":
    raise ValueError("bench_sasrec_step times the CE loss (config.loss.type='ce')")
  data = loop.load_data(config.data)
  task = loop.build_task(config, data.num_items)
  mesh = shd.make_mesh((-1, 1, 1))
  items, offsets = data.train_sequences()
  ds, _ = pipeline.train_dataset(
      items, offsets, max_len=task.model_cfg.max_len, stride=config.input.stride,
      windows_per_user=config.input.windows_per_user,
      batch_size=config.input.batch_size, num_epochs=1, seed=0)
  batches = [shd.global_batch(ds[i], mesh) for i in range(args.steps)]
  rng = jax.random.key(1)
  tx = optim_lib.make_optimizer(config.optim, 10_000)
  ema = config.optim.ema_decay

  runners, cost = {}, {}
  for name, loss_fn in (("shipped", task.loss), ("all_outputs", all_outputs_loss(task))):
    state, sharding = state_lib.create_train_state(task.init, tx, mesh, "dp",
                                                   jax.random.key(0), ema=ema > 0)
    step = step_lib.make_train_step(loss_fn, tx, sharding, mesh, ema_decay=ema)
    c = step.lower(state, batches[0], rng).compile().cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    cost[name] = c.get("flops", 0.0) / 1e9
    for _ in range(2):                              # compile + warm-up
      state, out = step(state, batches[0], rng)
    jax.block_until_ready(out)
    runners[name] = [step, state]
  times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, r in runners.items():
      t0 = time.perf_counter()
      for b in batches:
        r[1], out = r[0](r[1], b, rng)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / len(batches))
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"\nSASRec step (median of {args.rounds} rounds x {args.steps} steps), batch "
        f"{config.input.batch_size} x {task.model_cfg.max_len}, loss on the last "
        f"{config.input.stride}, CPU {os.cpu_count()} cores")
  for name in runners:
    print(f"  {name:<12}{med[name] * 1e3:8.1f} ms  {cost[name]:6.3f} GFLOP")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"median_s": med, "times_s": times, "gflops": cost,
               "load_average": os.getloadavg(), "args": vars(args)}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

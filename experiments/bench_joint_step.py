r"""Joint step time vs the SASRec-only step plus the T5-only step, at the same shapes.

Issue target: joint <= 1.10 x (SASRec step + T5 step). The three steps train on the same
MovieLens-100K batches (experiments/joint_ml100k.py: batch 32 windows of 50 items, loss on
the last 10 positions; prompts of 64 tokens naming the last 10 items; 1,683 catalogue rows):
  sasrec  the foundation's SASRec step (`recjax.train.step`, CE on the window's positions);
  t5      the same T5 alone as a recommender: encoder over the prompt (with item tokens as
          ordinary token embeddings), one decoder step, item softmax against its own item
          embedding table; the foundation's train step as for SASRec (AdamW, EMA, norms);
  t5+k    the same with k learned vectors before the prompt, so its encoder runs at the
          joint model's length (k soft prompts + prompt); a second ratio uses it;
  joint   the joint step of the config (`recjax.train.joint_step`, schedule "joint": CRM +
          LLM + KL + layer alignment, bridge in both directions, title table from cache).
Each is compiled once and warmed up; then every cycle runs one step of each in turn, each
timed to completion (`--rounds` x `--steps` cycles; step-by-step interleaving, so the VM's
drift hits all alike); the table shows each one's median step, the ratio of the medians, the
median of the per-cycle ratios, and
XLA's cost analysis of each compiled step (GFLOP, GB accessed), which does not drift with the
machine's load the way times do.

Run (CPU, quiet machine):
  python experiments/bench_joint_step.py --steps 10 --rounds 31 --out /tmp/recjax/bench_joint_step.json
Hardware: 2-core CPU. Time: ~3 minutes.
Expected (sessions 5-7, quiet 2-core CPU): joint / (SASRec + t5+4), the ratio at the same
shapes (the T5 inside the joint step encodes k soft prompts + the prompt), ~1.01-1.14, median
run ~1.06 (session 7: 1.054); target <= 1.10. Against the T5 on the bare prompt ~1.10-1.24
(median run ~1.13-1.15; session 7: 1.125). XLA flops ratio 1.113 (vs t5+4: 1.053).
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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from recjax import sharding as shd  # noqa: E402
from recjax.configs import load_config_file  # noqa: E402
from recjax.models.t5 import T5  # noqa: E402
from recjax.train import joint_loop, joint_step, loop, stages  # noqa: E402
from recjax.train import optimizer as optim_lib  # noqa: E402
from recjax.train import state as state_lib  # noqa: E402
from recjax.train import step as step_lib  # noqa: E402


class T5Recommender(nn.Module):
  """T5 alone: prompt -> one decoder step -> logits over its own item table.

  num_prompts > 0 prepends that many learned vectors to the encoder input, so the encoder
  runs at the joint model's length (k soft prompts + the prompt)."""
  t5: T5
  num_rows: int
  num_prompts: int = 0

  @nn.compact
  def __call__(self, ids, mask, deterministic=False):
    mask = mask.astype(bool)
    x = self.t5.shared(ids)
    if self.num_prompts:
      prompts = self.param("prompts", nn.initializers.normal(0.02),
                           (self.num_prompts, x.shape[-1]))
      x = jnp.concatenate([jnp.broadcast_to(prompts, (x.shape[0], *prompts.shape)), x], 1)
      mask = jnp.concatenate([jnp.ones((x.shape[0], self.num_prompts), bool), mask], 1)
    enc, _ = self.t5.encoder(x, mask, deterministic=deterministic)
    start = jnp.zeros((ids.shape[0], 1), jnp.int32)     # as JointModel.llm_forward
    y, _ = self.t5.decoder(self.t5.shared(start), None, enc, mask,
                           deterministic=deterministic)
    state = y[:, 0]
    table = self.param("items", nn.initializers.normal(0.02),
                       (self.num_rows, state.shape[-1]))
    return state @ table.T


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--allocator", default="auto", help=allocator.HELP)
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "joint_ml100k.py"))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default="/tmp/recjax/bench_joint_step.json")
  args = parser.parse_args()
  print(f"allocator: {allocator.loaded()}", flush=True)
  config = load_config_file(args.config)
  data = loop.load_data(config.data)
  builder, vocab = joint_loop.build_prompts(config, data)
  task = joint_loop.build_task(config, data.num_items, vocab)
  mesh = shd.make_mesh((-1, 1, 1))
  items, offsets = data.train_sequences()
  ds, _ = joint_loop.stage_dataset(
      items, offsets, np.arange(data.num_users), builder, max_len=task.cfg.crm.max_len,
      stride=config.input.stride, batch_size=config.input.batch_size,
      num_steps=args.steps, seed=0)
  batches = [ds[i] for i in range(args.steps)]
  rng = jax.random.key(1)
  num_steps = 10_000

  # Joint.
  tx = joint_step.make_joint_optimizer(config.optim, num_steps)
  state, sharding = joint_loop._create_state(config, task, tx, mesh, jax.random.key(0),
                                             ema=config.optim.ema_decay > 0)
  jstep = joint_step.make_joint_train_step(task.loss, tx, sharding, mesh,
                                           ema_decay=config.optim.ema_decay,
                                           norms_fn=task.normalizers)
  catalogue = joint_loop._catalogue_fn(task, builder, mesh)(state.params)
  controls = stages.controls(stages.SCHEDULES[config.loss.schedule][0], state.params,
                             catalogue)
  joint_batches = [shd.global_batch(b, mesh) for b in batches]

  # SASRec alone (the CRM config of the joint model, through the foundation's task).
  crm_config = load_config_file(os.path.join(ROOT, "experiments", "sasrec_ml100k.py"))
  for k, v in config.crm.to_dict().items():
    if k in crm_config.model:
      crm_config.model[k] = v
  sas_task = loop.build_task(crm_config, data.num_items)
  sas_tx = optim_lib.make_optimizer(crm_config.optim, num_steps)
  sas_state, sas_sharding = state_lib.create_train_state(
      sas_task.init, sas_tx, mesh, "dp", jax.random.key(0), ema=True)
  sas_step = step_lib.make_train_step(sas_task.loss, sas_tx, sas_sharding, mesh,
                                      ema_decay=crm_config.optim.ema_decay)
  sas_batches = [shd.global_batch({k: b[k] for k in ("inputs", "labels", "mask")}, mesh)
                 for b in batches]

  # T5 alone, on the prompt, and at the joint encoder length (k + prompt positions).
  soft = task.cfg.bridge.num_soft_prompts if task.cfg.bridge.crm_to_llm else 0
  t5_batches = [shd.global_batch({k: b[k] for k in ("llm_input_ids", "llm_input_mask",
                                                  "target", "target_mask")}, mesh)
                for b in batches]

  def t5_runner(num_prompts):
    rec = T5Recommender(T5(task.cfg.llm), task.cfg.num_rows, num_prompts)
    t5_tx = optim_lib.make_optimizer(config.optim, num_steps)

    def t5_loss(params, batch, r):
      logits = rec.apply({"params": params}, batch["llm_input_ids"],
                         batch["llm_input_mask"], rngs={"dropout": r})
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
      w = batch["target_mask"].astype(jnp.float32)
      return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), {}

    # The foundation's train step, as for SASRec: donated state, EMA, norms in the metrics.
    t5_state, t5_sharding = state_lib.create_train_state(
        lambda key: rec.init(key, batches[0]["llm_input_ids"],
                             batches[0]["llm_input_mask"])["params"],
        t5_tx, mesh, "dp", jax.random.key(0), ema=config.optim.ema_decay > 0)
    t5_step = step_lib.make_train_step(t5_loss, t5_tx, t5_sharding, mesh,
                                       ema_decay=config.optim.ema_decay, weight_key=None)
    return [lambda s, b: t5_step(s, b, rng), t5_state, t5_batches,
            lambda s, b: t5_step.lower(s, b, rng)]

  runners = {
      "sasrec": [lambda s, b: sas_step(s, b, rng), sas_state, sas_batches,
                 lambda s, b: sas_step.lower(s, b, rng)],
      "t5": t5_runner(0),
      **({f"t5+{soft}": t5_runner(soft)} if soft else {}),
      "joint": [lambda s, b: jstep(s, b, rng, controls), state, joint_batches,
                lambda s, b: jstep.lower(s, b, rng, controls)],
  }
  # XLA's own count of each step's work: deterministic, unlike CPU times on a shared VM.
  cost = {}
  for name, r in runners.items():
    c = r[3](r[1], r[2][0]).compile().cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    cost[name] = {"gflops": c.get("flops", 0.0) / 1e9,
                  "gbytes": c.get("bytes accessed", 0.0) / 1e9}
  compile_s = {}
  for name, r in runners.items():
    t0 = time.perf_counter()
    for _ in range(2):      # compile + warm-up
      r[1], out = r[0](r[1], r[2][0])
    jax.block_until_ready(out)
    compile_s[name] = time.perf_counter() - t0
  # Step-by-step interleaving: each cycle runs ONE step of every runner in turn, each timed
  # to completion, so this VM's drift (up to 30% between seconds) hits all of them alike;
  # rounds x steps cycles, medians per runner and of the per-cycle ratio.
  times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for i in range(args.steps):
      for name, r in runners.items():
        t0 = time.perf_counter()
        r[1], out = r[0](r[1], r[2][i])
        jax.block_until_ready(out)
        times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  ratio = med["joint"] / (med["sasrec"] + med["t5"])
  ratio_k = med["joint"] / (med["sasrec"] + med[f"t5+{soft}"]) if soft else ratio
  per_cycle = statistics.median(
      j / (a + b) for j, a, b in zip(times["joint"], times["sasrec"], times["t5"]))
  per_cycle_k = statistics.median(
      j / (a + b) for j, a, b in zip(times["joint"], times["sasrec"],
                                     times[f"t5+{soft}" if soft else "t5"]))
  print(f"\nstep time (median of {args.rounds} rounds x {args.steps} steps), batch "
        f"{config.input.batch_size}, CPU {os.cpu_count()} cores")
  for name in runners:
    print(f"  {name:<8}{med[name] * 1e3:9.1f} ms   {cost[name]['gflops']:7.2f} GFLOP "
          f"{cost[name]['gbytes']:6.2f} GB   (compile+warm-up {compile_s[name]:.1f} s)")
  print(f"  joint / (sasrec + t5) = {ratio:.3f}   (T5 on the bare prompt); median of the "
        f"per-cycle ratios {per_cycle:.3f}")
  flop_ratio = cost["joint"]["gflops"] / (cost["sasrec"]["gflops"] + cost["t5"]["gflops"])
  print(f"  XLA flops: joint / (sasrec + t5) = {flop_ratio:.3f}")
  if soft:
    print(f"  joint / (sasrec + t5+{soft}) = {ratio_k:.3f}   (same shapes: T5 at the joint "
          f"encoder length; target <= 1.10); median of the per-cycle ratios {per_cycle_k:.3f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"median_s": med, "times_s": times, "ratio": ratio,
               "ratio_per_cycle_median": per_cycle,
               "ratio_same_encoder_length": ratio_k,
               "ratio_same_encoder_length_per_cycle_median": per_cycle_k, "compile_s": compile_s,
               "xla_cost": cost, "flop_ratio": flop_ratio,
               "load_average": os.getloadavg(), "args": vars(args)}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

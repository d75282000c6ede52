"""`train_and_evaluate(config, workdir)`: the SASRec training loop.

Order of events:
  1. data: load (or reuse the cached) preprocessed dataset, print its stats;
  2. mesh + state: shapes first, shardings from logical names, jitted init;
  3. resume: the latest checkpoint in the workdir, if any (state + the loop's
     bookkeeping), else a fresh start from `config.seed`;
  4. train: one jitted step per batch; batches are a pure function of
     (seed, step), so a resumed run replays exactly what an uninterrupted run
     would; validation every `eval_every_steps`, the best parameters kept,
     early stopping after `patience` evaluations without improvement;
  5. test: restore the best parameters, evaluate validation and test under the
     configured protocols, write `<workdir>/results.json`, print a table.

Preemption: SIGTERM (or JAX's preemption notice with several processes) makes
the loop save a checkpoint at the current step, wait for it, print a message
and return `{"preempted": True, ...}` without testing (the launcher exits 0);
running the same command again resumes from that step. See
`recjax.train.preemption`. The workdir may be a `gs://` URL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import tqdm

from recjax import allocator
from recjax import evaluation
from recjax import sharding as shd
from recjax import data as data_lib
from recjax.data.preprocess import as_config as preprocess_config
from recjax.data import pipeline
from recjax.models.sasrec import SASRecConfig
from recjax.train import checkpoint as ckpt_lib
from recjax.train import optimizer as optim_lib
from recjax.train import preemption
from recjax.train import state as state_lib
from recjax.train import step as step_lib
from recjax.train.sequential import SequentialTask
from recjax.train.writers import MetricWriter


def load_data(cfg) -> data_lib.SequenceData:
  """The preprocessed dataset named by `config.data` (cached on disk)."""
  fields = {f.name for f in dataclasses.fields(data_lib.PreprocessConfig)}
  pre = preprocess_config({k: v for k, v in cfg.items() if k in fields})
  return data_lib.load_sequence_data(cfg.name, cfg.data_dir, cfg.cache_dir, pre,
                                     download=cfg.get("download", True))


def build_task(config, num_items: int) -> SequentialTask:
  """A `SequentialTask` from `config.model` / `config.loss`.

  `config.model.dtype` may be "float32" (default) or "bfloat16": the activation dtype
  (parameters stay float32; logits and losses are float32 either way).
  """
  import jax.numpy as jnp
  model = config.model.to_dict()
  if "dtype" in model:
    if str(model["dtype"]) not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype: unknown {model['dtype']!r} (float32, bfloat16)")
    model["dtype"] = jnp.dtype(model["dtype"])
  model_cfg = SASRecConfig(num_items=num_items, **model)
  return SequentialTask(model_cfg, loss_type=config.loss.type,
                        num_negatives=config.loss.get("num_negatives", 1),
                        label_smoothing=config.loss.get("label_smoothing", 0.0))


def build_evaluators(config, task, data, mesh) -> dict[str, Any]:
  """{name: (evaluator, histories, targets, seen items)} for every configured protocol."""
  out = {}
  max_len = task.model_cfg.max_len
  for split in ("valid", "test"):
    hist, target, _ = data.eval_examples(split, max_len)
    seen = data.seen_items(split)
    for proto in config.eval.protocols:
      sampled = proto.candidates == "sampled"
      protocol = evaluation.Protocol(
          split=split, candidates=proto.candidates,
          num_negatives=proto.num_negatives if sampled else None,
          sampling=proto.sampling if sampled else None,
          exclude_history=config.eval.exclude_history,
          ks=tuple(config.eval.ks), num_items=data.num_items)
      ev = evaluation.RankingEvaluator(
          task.scores, protocol, batch_size=config.eval.batch_size,
          batch_sharding=shd.batch_sharding(mesh))
      out[f"{split}/{proto.name}"] = (ev, hist, target, seen)
  return out


def run_evaluators(evaluators, params, names, popularity, seed) -> dict:
  results = {}
  for name in names:
    ev, hist, target, seen = evaluators[name]
    results[name] = ev.run(params, hist, target, seed=seed,
                           popularity=popularity, seen=seen)
  return results


@dataclasses.dataclass
class LoopMeta:
  """The loop's bookkeeping, checkpointed beside the state (JSON)."""
  best_value: float = -math.inf
  best_step: int = -1
  evals_without_improvement: int = 0
  train_seconds: float = 0.0      # time inside train steps (no eval, no IO)
  wall_seconds: float = 0.0       # everything, summed over restarts
  target_reached: dict | None = None
  stopped_early: bool = False


def _setup(config, workdir, devices=None):
  data = load_data(config.data)
  if jax.process_index() == 0:
    logging.info("dataset statistics:\n%s", data_lib.format_stats(data.stats))
    print(data_lib.format_stats(data.stats), flush=True)
  mesh = shd.make_mesh(tuple(config.mesh.shape), devices)
  task = build_task(config, data.num_items)
  return data, mesh, task


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Trains, keeps the best checkpoint, evaluates it; returns results.json.

  devices: the devices of the mesh (default: all); `config.mesh.shape` must
    fit their number.
  """
  t_start = time.perf_counter()
  workdir = ckpt_lib.resolve_dir(workdir)
  is_main = jax.process_index() == 0
  data, mesh, task = _setup(config, workdir, devices)

  items, offsets = data.train_sequences()
  shd.check_process_rows(mesh, config.input.batch_size)
  ds, ds_stats = pipeline.train_dataset(
      items, offsets, max_len=task.model_cfg.max_len,
      stride=config.input.stride,
      windows_per_user=config.input.windows_per_user,
      batch_size=config.input.batch_size,
      num_epochs=config.train.num_epochs, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      user_weight_power=config.input.get("user_weight_power", 0.0))
  num_steps = len(ds)
  steps_per_epoch = ds_stats["steps_per_epoch"]
  eval_every = config.train.eval_every_steps or max(1, round(steps_per_epoch))
  logging.info("input pipeline: %s", ds_stats)

  tx = optim_lib.make_optimizer(config.optim, num_steps)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  ema_decay = config.optim.get("ema_decay", 0.0)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=config.train.async_checkpoints)
  meta = LoopMeta()
  if ckpt.latest_step() is not None:  # restore into shapes: no second state in memory
    abstract, state_sharding = state_lib.abstract_train_state(
        task.init, tx, mesh, config.mesh.rules, ema=ema_decay > 0)
    state, meta_dict = ckpt.restore(abstract)
    meta = LoopMeta(**meta_dict)
    logging.info("resumed from %s at step %d", workdir, int(state.step))
  else:
    state, state_sharding = state_lib.create_train_state(
        task.init, tx, mesh, config.mesh.rules, init_rng, ema=ema_decay > 0)
  start_step = int(state.step)

  train_step = step_lib.make_train_step(task.loss, tx, state_sharding, mesh,
                                        ema_decay=ema_decay,
                                        grad_accum=config.train.get("grad_accum", 1))
  evaluators = build_evaluators(config, task, data, mesh)
  popularity = data.item_popularity()
  monitor_name = f"valid/{config.eval.protocols[0].name}"
  monitor_key = config.train.monitor
  writer = MetricWriter(workdir)
  params_sharding = state_sharding.params

  last_saved = start_step

  def checkpoint(step: int) -> None:
    nonlocal last_saved
    meta.wall_seconds = wall_before + time.perf_counter() - t_start
    ckpt.save(step, state, dataclasses.asdict(meta))
    last_saved = step

  wall_before = meta.wall_seconds
  pending: list[dict] = []
  bar = tqdm.tqdm(total=num_steps, initial=start_step, disable=not is_main,
                  desc="train", unit="step", mininterval=2.0, smoothing=0.1)
  say = bar.write if is_main else lambda _: None
  guard = preemption.PreemptionGuard()
  step = start_step
  t_chunk = time.perf_counter()
  with guard:
    for step, batch in pipeline.iterate_from(ds, start_step):
      if meta.stopped_early:
        break
      state, metrics = train_step(state, shd.global_batch(batch, mesh),
                                  train_rng)
      pending.append(metrics)
      done = step + 1
      bar.update(1)
      is_eval = done % eval_every == 0 or done == num_steps
      if done % config.train.log_every_steps == 0 or is_eval:
        host = jax.device_get(pending)
        pending = []
        meta.train_seconds += time.perf_counter() - t_chunk
        avg = {f"train/{k}": float(np.mean([m[k] for m in host]))
               for k in host[-1]}
        if not np.isfinite(avg["train/loss"]):
          raise FloatingPointError(f"non-finite loss at step {done}: {avg}")
        avg["train/epoch"] = done / steps_per_epoch
        writer.write(done, avg)
        bar.set_postfix(loss=f"{avg['train/loss']:.4f}",
                        best=f"{max(meta.best_value, 0):.4f}")
        if is_eval:
          res = run_evaluators(evaluators, state.eval_params(), [monitor_name],
                               popularity, config.seed)[monitor_name]
          value = res[monitor_key]
          writer.write(done, {f"{monitor_name}/{k}": v for k, v in res.items()
                              if isinstance(v, (int, float))})
          say(f"step {done} (epoch {done / steps_per_epoch:.2f}): "
                    f"train loss {avg['train/loss']:.4f}, {monitor_name} "
                    f"{monitor_key} {value:.4f}")
          if value > meta.best_value:
            meta.best_value, meta.best_step = float(value), done
            meta.evals_without_improvement = 0
            ckpt.save_best(done, state.eval_params(), {"step": done, **{
                k: v for k, v in res.items() if isinstance(v, (int, float))}})
          else:
            meta.evals_without_improvement += 1
          target = config.train.get("target_value", 0.0)
          if target and value >= target and meta.target_reached is None:
            meta.target_reached = {
                "step": done, "epoch": done / steps_per_epoch, "value": value,
                "train_seconds": meta.train_seconds,
                "wall_seconds": wall_before + time.perf_counter() - t_start}
          patience = config.train.patience
          if patience and meta.evals_without_improvement >= patience:
            meta.stopped_early = True
            say(f"early stop at step {done}: no improvement in "
                      f"{patience} evaluations")
          checkpoint(done)
        t_chunk = time.perf_counter()
      every = config.train.checkpoint_every_steps
      if every and done % every == 0 and not is_eval:  # any step, logged or not
        # Never save a diverged state (a restart would resume from it): the losses since
        # the last log must be finite, as the logging branch checks.
        losses = [float(m["loss"]) for m in jax.device_get(pending)]
        if not np.all(np.isfinite(losses)):
          raise FloatingPointError(f"non-finite loss before step {done}: {losses}")
        meta.train_seconds += time.perf_counter() - t_chunk
        checkpoint(done)
        t_chunk = time.perf_counter()
      if guard.should_stop(done):       # all processes agree on the step
        if last_saved != done:
          meta.train_seconds += time.perf_counter() - t_chunk
          checkpoint(done)
        break
  bar.close()
  ckpt.wait()
  if guard.stop_step is not None:
    writer.close()
    ckpt.close()
    message = (f"preempted: saved a checkpoint at step {guard.stop_step} of "
               f"{num_steps} in {workdir}; run the same command again to "
               "resume")
    logging.warning(message)
    if is_main:
      print(message, flush=True)
    return {"preempted": True, "steps": guard.stop_step,
            "num_steps": num_steps, "workdir": workdir}

  # Test on the best checkpoint.
  best_params, best_meta = ckpt.restore_best(
      state_lib.abstract_like(state.params, params_sharding))
  final = run_evaluators(evaluators, best_params, sorted(evaluators),
                         popularity, config.seed)
  meta.wall_seconds = wall_before + time.perf_counter() - t_start
  results = {
      "config": config.to_dict(),
      "dataset": {"name": data.name, "stats": data.stats},
      "input": ds_stats,
      "protocols": {k: evaluators[k][0].protocol.to_dict() for k in final},
      "metrics": final,
      "best_step": best_meta["step"],
      "steps": int(state.step),
      "epochs": int(state.step) / steps_per_epoch,
      "stopped_early": meta.stopped_early,
      "train_seconds": meta.train_seconds,
      "wall_seconds": meta.wall_seconds,
      "target_reached": meta.target_reached,
      "devices": jax.device_count(),
      "mesh": dict(mesh.shape),
      "allocator": allocator.loaded(),   # timings depend on it (recjax/allocator.py)
  }
  if is_main:
    _write_results(workdir, "results.json", results, evaluators, final)
  writer.close()
  ckpt.close()
  return results


def evaluate(config, workdir: str, devices=None) -> dict:
  """`--mode=eval`: restores the best parameters and evaluates them.

  The mesh is built from the current config and devices (default: all), so a
  checkpoint written on another mesh is resharded on restore.
  """
  workdir = ckpt_lib.resolve_dir(workdir)
  data, mesh, task = _setup(config, workdir, devices)
  tx = optim_lib.make_optimizer(config.optim, 1)
  state, state_sharding = state_lib.create_train_state(
      task.init, tx, mesh, config.mesh.rules, jax.random.key(config.seed))
  ckpt = ckpt_lib.Checkpointer(workdir)
  params, meta = ckpt.restore_best(
      state_lib.abstract_like(state.params, state_sharding.params))
  evaluators = build_evaluators(config, task, data, mesh)
  final = run_evaluators(evaluators, params, sorted(evaluators),
                         data.item_popularity(), config.seed)
  results = {"best_step": meta["step"], "metrics": final,
             "protocols": {k: evaluators[k][0].protocol.to_dict()
                           for k in final}}
  if jax.process_index() == 0:
    _write_results(workdir, "eval_results.json", results, evaluators, final)
  ckpt.close()
  return results


def _write_results(workdir, filename, results, evaluators, final) -> None:
  path = epath.Path(workdir) / filename      # local or gs://
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2, default=str))
  for name in sorted(final):
    print(evaluation.format_results(final[name], evaluators[name][0].protocol),
          flush=True)
  print(f"wrote {path}", flush=True)

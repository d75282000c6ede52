"""`train_and_evaluate_joint(config, workdir)`: SASRec + T5 + bridge trained by one step.

Order of events (compare `recjax.train.loop`, the SASRec-only loop):
  1. data: the preprocessed dataset (cached), the text side: a tokenizer (the checkpoint's,
     or a SentencePiece vocabulary trained on the catalogue for a T5 from scratch), the
     retrieval prompts (`recjax.data.prompts`) and the tokenized titles of every item;
  2. task + state: `JointTask` from the config, per-tower optimizers, the state sharded by
     the logical rules; an HF checkpoint (`llm.checkpoint`) replaces the random T5;
  3. resume from the latest checkpoint in the workdir, if any;
  4. train: a schedule of stages (`recjax.train.stages`); each stage feeds its own data
     subset (random access by step, so a resumed run replays the same batches) and its
     loss weights / trainable towers as *inputs* of the one compiled step. A row of a
     batch is a training window (as the SASRec loop's) plus a prompt naming the window's
     last items; the CRM learns every position of the window's last `stride` positions,
     the LLM head the item after the window. Validation every `eval_every_steps` reports
     the CRM and the LLM head; the best parameters (by `train.monitor`) are kept;
  5. test: the best parameters, CRM alone, LLM alone and CRM-entropy routing at every
     fraction of `routing.fractions` (full ranking), `results.json`, `routing_curve.json`
     and `routing_curve.png`.

Title knowledge for the CRM (`bridge.title_mode`): "cache" refreshes the table of T5 title
encodings every `train.title_refresh_steps` steps (and at every evaluation, from the
evaluated parameters); checkpoints are written on refresh boundaries only, so a resumed
run recomputes exactly the table an uninterrupted run had. "step" encodes all titles inside
every step (fresh, with gradient, and costly: see `recjax.models.joint`).

Preemption (`recjax.train.preemption`): SIGTERM saves a checkpoint at the current step and
returns `{"preempted": True, ...}`; the same command resumes. With `title_mode="cache"` a
stop between refresh boundaries resumes with a table refreshed at the stop step (not the
last boundary), the one place where a resumed run is not bitwise the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from recjax import allocator
from recjax import evaluation
from recjax import metrics as metrics_lib
from recjax import sharding as shd
from recjax.data import pipeline
from recjax.data import prompts as prompts_lib
from recjax.train import checkpoint as ckpt_lib
from recjax.train import joint_step as joint_step_lib
from recjax.train.joint_eval import (
    HEADS, JointEvaluator, format_coverage, format_routing, monitor_value, save_routing_plot)
from recjax.train import preemption
from recjax.train import stages as stages_lib
from recjax.train import state as state_lib
from recjax.train.joint_task import JointTask, build_joint_task
from recjax.train.loop import LoopMeta, load_data
from recjax.train.writers import MetricWriter

# XLA options for a program that runs once (the init) or in tests (`train.fast_compile`):
# compiling the joint model's programs at full optimisation costs tens of seconds on a CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def _compile_options(config) -> dict | None:
  return FAST_COMPILE if config.train.get("fast_compile", False) else None


# ---- text side ------------------------------------------------------------------------------

def build_prompts(config, data) -> tuple[prompts_lib.PromptBuilder, int]:
  """(prompt builder, tokenizer vocabulary size) for the dataset's catalogue."""
  pcfg = prompts_lib.PromptConfig(**config.prompt.to_dict())
  checkpoint = config.llm.get("checkpoint", "")
  if checkpoint:
    tokenize, vocab, item_id = prompts_lib.load_text_tokenizer(checkpoint)
  else:
    template = [" ".join([pcfg.prefix, pcfg.separator, pcfg.suffix])]
    tokenize, vocab, item_id = prompts_lib.train_text_vocab(
        prompts_lib.item_texts(data.item_titles, data.item_info),
        config.text.vocab_size, os.path.join(config.data.cache_dir, "text_vocab"),
        extra_texts=template * 10)
  titles = prompts_lib.display_titles(data.item_titles, data.item_info)
  return prompts_lib.PromptBuilder(tokenize, titles, pcfg, item_token_id=item_id), vocab


def build_task(config, num_items: int, vocab_size: int) -> JointTask:
  """The JointTask; a T5 from scratch gets the trained vocabulary (rounded up to 128)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if not cfg.llm.get("checkpoint", ""):
    if cfg.llm.get("vocab_size", 0):
      raise ValueError(f"llm.vocab_size={cfg.llm.vocab_size}: only for a checkpoint "
                       "(llm.checkpoint); a T5 from scratch takes the trained vocabulary "
                       "(text.vocab_size)")
    cfg.llm.vocab_size = int(math.ceil(vocab_size / 128) * 128)
  return build_joint_task(cfg, num_items)


# ---- data -----------------------------------------------------------------------------------

def user_subsets(num_users: int, fractions: dict[str, float], seed: int
                 ) -> dict[str, np.ndarray]:
  """{"all": every user, name: a random user subset of that fraction}; the named subsets
  are disjoint (CoReLLa trains its stages 2 and 3 on different samples)."""
  order = np.random.default_rng([seed, 7]).permutation(num_users)
  out, begin = {"all": np.arange(num_users)}, 0
  for name in sorted(fractions):
    n = int(round(fractions[name] * num_users))
    if begin + n > num_users:
      raise ValueError(f"train.subsets: fractions {dict(fractions)} add up to more than 1")
    out[name] = np.sort(order[begin:begin + n])
    begin += n
  return out


def select_users(items: np.ndarray, offsets: np.ndarray, users: np.ndarray):
  """(items, offsets) of `users`' sequences only."""
  lengths = np.diff(offsets)[users]
  new_offsets = np.zeros(len(users) + 1, np.int64)
  np.cumsum(lengths, out=new_offsets[1:])
  flat = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in users])
  return items[flat], new_offsets


@dataclasses.dataclass(frozen=True)
class JointBatcher:
  """Window batches (as `pipeline.WindowBatcher`) plus prompts, LLM targets and users.

  Adds llm_input_ids/llm_input_mask/llm_item_ids int32|bool[B, T] (prompts built from the
  window's items), target int32[B] = the window's last label, target_mask bool[B],
  user_ids int32[B] (1-based; 0 for padding rows).
  """
  windows: pipeline.WindowBatcher
  users: np.ndarray          # int64[E] 0-based user of each window
  prompts: prompts_lib.PromptBuilder

  def __call__(self, example_ids: np.ndarray) -> dict[str, np.ndarray]:
    batch = self.windows(example_ids)
    batch.update(self.prompts(batch["inputs"]))
    batch["target"] = batch["labels"][:, -1]
    batch["target_mask"] = batch["mask"][:, -1]
    real = example_ids >= 0
    batch["user_ids"] = np.where(real, self.users[np.where(real, example_ids, 0)] + 1,
                                 0).astype(np.int32)
    return batch


def stage_dataset(items, offsets, users, builder, *, max_len, stride, batch_size,
                  num_steps, seed, process_index=0, process_count=1):
  """`num_steps` batches over the windows of `users`, random access by step."""
  if batch_size % process_count:
    raise ValueError(f"input.batch_size={batch_size} not divisible by {process_count} "
                     "processes")
  sub_items, sub_offsets = select_users(items, offsets, users)
  ends, starts = pipeline.window_ends(sub_offsets, stride)
  user_of_window = users[np.searchsorted(sub_offsets, starts, side="right") - 1]
  batcher = JointBatcher(
      pipeline.WindowBatcher(sub_items.astype(np.int32), ends, starts, max_len, stride),
      user_of_window, builder)
  source = pipeline.EpochShuffledBatches(len(ends), batch_size,
                                         num_steps * batch_size / len(ends), seed)
  assert len(source) == num_steps, (len(source), num_steps)
  local = batch_size // process_count
  lo = process_index * local
  ds = grain.MapDataset.source(source).map(lambda ids: batcher(ids[lo:lo + local]))
  return ds, {"num_users": int(len(users)), "num_windows": int(len(ends)),
              "epochs": num_steps * batch_size / len(ends)}


# ---- setup checks ---------------------------------------------------------------------------

def check_bf16_params(param_dtype, ema_decay: float) -> None:
  """T5 parameters below float32 have no float32 master copy here: an update smaller than
  half a unit in the last place is rounded away (logged), and a moving average kept in that
  dtype never moves at all (an error)."""
  dtype = jnp.dtype(param_dtype)
  if dtype == jnp.float32:
    return
  if ema_decay > 0:
    raise ValueError(
        f"optim.ema_decay={ema_decay} with llm.param_dtype={dtype.name}: the moving average "
        f"is kept in {dtype.name}, where (1 - decay) * (params - average) rounds away, so it "
        "never moves; use llm.param_dtype='float32' (llm.dtype='bfloat16' keeps bf16 "
        "compute) or optim.ema_decay=0")
  logging.warning("llm.param_dtype=%s: parameters are updated in %s without a float32 "
                  "master copy; updates below half an ulp (~0.2-0.4%% relative) are lost. "
                  "llm.param_dtype='float32' with llm.dtype='bfloat16' avoids it.",
                  dtype.name, dtype.name)


# ---- the loop -------------------------------------------------------------------------------

def _setup(config):
  data = load_data(config.data)
  builder, vocab = build_prompts(config, data)
  task = build_task(config, data.num_items, vocab)
  mesh = shd.make_mesh(tuple(config.mesh.shape))
  return data, builder, task, mesh


def _catalogue_fn(task: JointTask, builder, mesh, compiler_options=None):
  """params -> the step's catalogue input for the configured title mode."""
  cfg = task.cfg
  if not cfg.bridge.llm_to_crm:
    return lambda params: {}
  titles = jax.device_put(builder.catalogue(), shd.replicated(mesh))
  if cfg.title_mode == "step":
    return lambda params: titles
  encode = jax.jit(task.encode_titles, out_shardings=shd.replicated(mesh),
                   compiler_options=compiler_options)
  return lambda params: {"title_table": encode(params, titles["title_ids"],
                                               titles["title_mask"])}


def _create_state(config, task, tx, mesh, rng, ema: bool):
  state, sharding = joint_step_lib.create_joint_train_state(
      task.init, tx, mesh, config.mesh.rules, rng, ema=ema, compiler_options=FAST_COMPILE)
  return state, sharding


def _load_llm_checkpoint(config, task, state, sharding):
  """Replaces the random T5 with `llm.checkpoint` (fresh starts only), in the configured
  parameter dtype; shapes and dtypes must match the configured T5."""
  from recjax.convert import load_t5_from_hf  # pylint: disable=g-import-not-at-top
  _, llm_params = load_t5_from_hf(config.llm.checkpoint,
                                  param_dtype=task.cfg.llm.param_dtype)
  if not task.cfg.text_head:       # llm.text_head=False: the joint model has no lm_head
    llm_params = {k: v for k, v in llm_params.items() if k != "lm_head"}
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), state.params["llm"])
  got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), llm_params)
  if expected != got:
    raise ValueError(f"llm.checkpoint {config.llm.checkpoint}: parameter shapes differ from "
                     "the configured T5 (set llm.preset to the checkpoint's size)")
  put = lambda: jax.device_put(llm_params, sharding.params["llm"])
  params = {**state.params, "llm": put()}
  # The EMA gets its own buffers: the step donates the state, and one buffer may not be
  # donated twice.
  ema = None if state.ema_params is None else {**state.ema_params, "llm": put()}
  return state.replace(params=params, ema_params=ema)


def train_and_evaluate_joint(config, workdir: str) -> dict:
  """Trains the joint model through its stages, tests the best parameters."""
  t_start = time.perf_counter()
  workdir = ckpt_lib.resolve_dir(workdir)
  is_main = jax.process_index() == 0
  data, builder, task, mesh = _setup(config)
  if is_main:
    from recjax import data as data_lib  # pylint: disable=g-import-not-at-top
    print(data_lib.format_stats(data.stats), flush=True)

  # Steps and stages.
  items, offsets = data.train_sequences()
  stride, batch_size = config.input.stride, config.input.batch_size
  all_windows = len(pipeline.window_ends(offsets, stride)[0])
  num_steps = int(math.ceil(config.train.num_epochs * all_windows / batch_size))
  steps_per_epoch = all_windows / batch_size
  schedule = stages_lib.get_schedule(config.loss.schedule)
  starts = stages_lib.stage_boundaries(schedule, num_steps) + [num_steps]
  subsets = user_subsets(data.num_users, dict(config.train.get("subsets", {}) or {}),
                         config.seed)
  datasets, input_stats = [], []
  shd.check_process_rows(mesh, batch_size)
  for i, stage in enumerate(schedule):
    if stage.data not in subsets:
      raise ValueError(f"stage {stage.name}: data {stage.data!r} is not 'all' or a key of "
                       f"train.subsets {sorted(subsets)}")
    ds, stats = stage_dataset(
        items, offsets, subsets[stage.data], builder, max_len=task.cfg.crm.max_len,
        stride=stride, batch_size=batch_size, num_steps=max(starts[i + 1] - starts[i], 0),
        seed=config.seed * 1000 + i, process_index=jax.process_index(),
        process_count=jax.process_count()) if starts[i + 1] > starts[i] else (None, {})
    datasets.append(ds)
    input_stats.append({"stage": stage.name, "steps": starts[i + 1] - starts[i],
                        "data": stage.data, **stats})
  eval_every = config.train.eval_every_steps or max(1, round(steps_per_epoch))
  refresh = config.train.get("title_refresh_steps", 0) or eval_every
  caching = task.cfg.bridge.llm_to_crm and task.cfg.title_mode == "cache"
  if caching and (refresh < 1 or eval_every % refresh):
    raise ValueError(f"train.eval_every_steps={eval_every} must be a multiple of "
                     f"train.title_refresh_steps={refresh} (bridge.title_mode 'cache')")
  logging.info("stages: %s", input_stats)

  # State, step, resume.
  # Each tower's lr schedule spans the steps it trains (a staged tower's step count stops
  # while it is frozen).
  steps_of = stages_lib.tower_steps(schedule, num_steps,
                                    jax.eval_shape(task.init, jax.random.key(0)))
  tx = joint_step_lib.make_joint_optimizer(config.optim, num_steps, tower_steps=steps_of)
  logging.info("steps each tower trains: %s", steps_of)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  ema_decay = config.optim.get("ema_decay", 0.0)
  check_bf16_params(task.cfg.llm.param_dtype, ema_decay)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=config.train.get("async_checkpoints",
                                                                    False))
  meta = LoopMeta()
  if ckpt.latest_step() is not None:  # restore into shapes: no second state in memory
    abstract, state_sharding = state_lib.abstract_train_state(
        task.init, tx, mesh, config.mesh.rules, ema=ema_decay > 0)
    state, meta_dict = ckpt.restore(abstract)
    meta = LoopMeta(**meta_dict)
  else:
    state, state_sharding = _create_state(config, task, tx, mesh, init_rng, ema_decay > 0)
    if config.llm.get("checkpoint", ""):
      state = _load_llm_checkpoint(config, task, state, state_sharding)
  start_step = int(state.step)
  options = _compile_options(config)
  train_step = joint_step_lib.make_joint_train_step(
      task.loss, tx, state_sharding, mesh, ema_decay=ema_decay, compiler_options=options,
      grad_accum=config.train.get("grad_accum", 1), norms_fn=task.normalizers)
  catalogue_of = _catalogue_fn(task, builder, mesh, options)
  evaluator = JointEvaluator(task, data, builder, mesh, batch_size=config.eval.batch_size,
                             exclude_history=config.eval.exclude_history,
                             ks=tuple(config.eval.ks), compiler_options=options)
  # How much history the prompts actually show (items dropped past prompt_len, titles cut).
  prompt_coverage = {split: builder.coverage(evaluator.examples[split][0]["inputs"])
                     for split in ("valid", "test")}
  if is_main:
    print(f"prompts (test users): {format_coverage(prompt_coverage['test'], config)}",
          flush=True)
  monitor = config.train.monitor
  head, _, metric = monitor.partition("/")  # e.g. "crm", "ndcg@10": also what bar.write shows
  known = {f"{m}@{k}" for m in metrics_lib.METRICS for k in config.eval.ks}
  if head not in HEADS or metric not in known:  # before any training time is spent
    raise ValueError(f"train.monitor={monitor!r}: expected <crm|llm>/<metric>, a metric "
                     f"of eval.ks={tuple(config.eval.ks)}: {sorted(known)}")
  writer = MetricWriter(workdir)
  wall_before = meta.wall_seconds

  saved = {"step": start_step}

  def checkpoint(step: int) -> None:
    meta.wall_seconds = wall_before + time.perf_counter() - t_start
    ckpt.save(step, state, dataclasses.asdict(meta))
    saved["step"] = step

  catalogue = catalogue_of(state.params)
  version = 0                      # bumps when the catalogue (title table) is refreshed
  controls_cache: dict[tuple[str, int], Any] = {}
  bar = tqdm.tqdm(total=num_steps, initial=start_step, disable=not is_main, desc="train",
                  unit="step", mininterval=2.0, smoothing=0.1)
  pending: list[dict] = []
  t_chunk = time.perf_counter()
  guard = preemption.PreemptionGuard()
  with guard:
    for i, stage in enumerate(schedule):
      lo, hi = starts[i], starts[i + 1]
      if hi <= max(lo, start_step) or meta.stopped_early:
        continue
      for local, batch in pipeline.iterate_from(datasets[i], max(start_step - lo, 0)):
        step = lo + local                # updates applied so far
        if caching and step % refresh == 0 and step != start_step:
          catalogue, version = catalogue_of(state.params), version + 1
        if (stage.name, version) not in controls_cache:
          controls = stages_lib.controls(stage, state.params, catalogue)
          if jax.process_count() == 1:    # once, not one transfer per flag and step
            controls = jax.device_put(controls, shd.replicated(mesh))
          controls_cache = {(stage.name, version): controls}
        state, metrics = train_step(state, shd.global_batch(batch, mesh), train_rng,
                                    controls_cache[(stage.name, version)])
        pending.append(metrics)
        bar.update(1)
        done = step + 1
        is_eval = done % eval_every == 0 or done == num_steps
        logged = done % config.train.log_every_steps == 0 or is_eval
        if logged:
          host = jax.device_get(pending)
          pending = []
          meta.train_seconds += time.perf_counter() - t_chunk
          avg = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[-1]}
          if not np.isfinite(avg["train/loss"]):
            raise FloatingPointError(f"non-finite loss at step {done}: {avg}")
          avg["train/epoch"] = done / steps_per_epoch
          writer.write(done, avg)
          bar.set_postfix(stage=stage.name, loss=f"{avg['train/loss']:.3f}")
        if is_eval:
          eval_params = state.eval_params()
          res = evaluator.run(eval_params, catalogue_of(eval_params), "valid")
          value = monitor_value(res, monitor)
          writer.write(done, {f"valid/{h}/{k}": v for h in HEADS for k, v in res[h].items()})
          bar.write(f"step {done} [{stage.name}]: loss {avg['train/loss']:.4f}, valid "
                    f"{metric} crm {res['crm'][metric]:.4f} llm {res['llm'][metric]:.4f}")
          if value > meta.best_value:
            meta.best_value, meta.best_step = value, done
            meta.evals_without_improvement = 0
            ckpt.save_best(done, eval_params, {"step": done, "stage": stage.name,
                                               **{f"{h}/{k}": v for h in HEADS
                                                  for k, v in res[h].items()}})
          else:
            meta.evals_without_improvement += 1
          patience = config.train.patience
          if patience and meta.evals_without_improvement >= patience:
            meta.stopped_early = True
            bar.write(f"early stop at step {done}")
          checkpoint(done)
        if logged:
          t_chunk = time.perf_counter()
        if meta.stopped_early:
          break
        if guard.should_stop(done):     # all processes agree on the step
          if saved["step"] != done:
            meta.train_seconds += time.perf_counter() - t_chunk
            checkpoint(done)
          break
      if guard.stop_step is not None:
        break
  bar.close()
  ckpt.wait()
  if guard.stop_step is not None:
    writer.close()
    ckpt.close()
    message = (f"preempted: saved a checkpoint at step {guard.stop_step} of {num_steps} in "
               f"{workdir}; run the same command again to resume")
    if is_main:
      print(message, flush=True)
    return {"preempted": True, "steps": guard.stop_step, "num_steps": num_steps,
            "workdir": workdir}

  best_params, best_meta = ckpt.restore_best(
      state_lib.abstract_like(state.params, state_sharding.params))
  best_catalogue = catalogue_of(best_params)
  fractions = tuple(config.routing.fractions)
  final = {split: evaluator.run(best_params, best_catalogue, split, fractions)
           for split in ("valid", "test")}
  meta.wall_seconds = wall_before + time.perf_counter() - t_start
  results = {
      "config": config.to_dict(),
      "dataset": {"name": data.name, "stats": data.stats},
      "stages": input_stats,
      "prompt_coverage": prompt_coverage,
      "protocols": {s: evaluator.protocol(s).to_dict() for s in final},
      "metrics": final,
      "best_step": best_meta["step"],
      "best_stage": best_meta.get("stage"),
      "steps": int(state.step),
      "epochs": int(state.step) / steps_per_epoch,
      "stopped_early": meta.stopped_early,
      "train_seconds": meta.train_seconds,
      "wall_seconds": meta.wall_seconds,
      "devices": jax.device_count(),
      "mesh": dict(mesh.shape),
      "allocator": allocator.loaded(),   # timings depend on it (recjax/allocator.py)
  }
  if is_main:
    _write_results(workdir, results, evaluator, tuple(config.eval.ks))
  writer.close()
  ckpt.close()
  return results


def evaluate_joint(config, workdir: str) -> dict:
  """`--mode=eval` for a joint config: the best parameters, all heads and the curve."""
  workdir = ckpt_lib.resolve_dir(workdir)
  data, builder, task, mesh = _setup(config)
  tx = joint_step_lib.make_joint_optimizer(config.optim, 1)
  state, sharding = _create_state(config, task, tx, mesh, jax.random.key(config.seed), False)
  ckpt = ckpt_lib.Checkpointer(workdir)
  params, meta = ckpt.restore_best(state_lib.abstract_like(state.params, sharding.params))
  options = _compile_options(config)
  evaluator = JointEvaluator(task, data, builder, mesh, batch_size=config.eval.batch_size,
                             exclude_history=config.eval.exclude_history,
                             ks=tuple(config.eval.ks), compiler_options=options)
  catalogue = _catalogue_fn(task, builder, mesh, options)(params)
  final = {split: evaluator.run(params, catalogue, split, tuple(config.routing.fractions))
           for split in ("valid", "test")}
  results = {"best_step": meta["step"], "metrics": final,
             "protocols": {s: evaluator.protocol(s).to_dict() for s in final}}
  if jax.process_index() == 0:
    _write_results(workdir, results, evaluator, tuple(config.eval.ks),
                   filename="eval_results.json")
  ckpt.close()
  return results


def _write_results(workdir, results, evaluator, ks, filename="results.json") -> None:
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / filename).write_text(json.dumps(results, indent=2, default=str))
  test = results["metrics"]["test"]
  (out / "routing_curve.json").write_text(json.dumps(
      {"protocol": evaluator.protocol("test").to_dict(),
       "uncertainty": "CRM next-item entropy", "curve": test["routing"]}, indent=2))
  for head in HEADS:
    print(f"[{head}] " + evaluation.format_results(test[head], evaluator.protocol("test")),
          flush=True)
  print("routing (test, CRM entropy decides who goes to the LLM):\n" +
        format_routing(test["routing"], ks), flush=True)
  if save_routing_plot(test["routing"], out / "routing_curve.png",
                       str(evaluator.protocol("test")),
                       "ndcg@10" if 10 in ks else f"ndcg@{ks[0]}"):
    print(f"wrote {out / 'routing_curve.png'}", flush=True)
  print(f"wrote {out / filename}", flush=True)

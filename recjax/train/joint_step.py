"""One jitted joint update with per-tower optimizers and *dynamic* trainable masks.

`step(state, batch, rng, controls) -> (state, metrics)`, `controls` as built by
`recjax.train.joint_task.stage_controls`: {"weights": {term: f32[]}, "trainable": a
params-shaped tree of bool[] (one flag per parameter, from the stage's tower / path
patterns), "catalogue": {...}}. Because weights and flags are array inputs, every stage of
a schedule runs the same compiled program.

Freezing: each tower ("crm", "llm", "bridge") has its own optax state (`per_tower`). After
the update, a frozen parameter and its optimizer moments are selected back from the old
state with `jnp.where(flag, new, old)`, so they are bitwise unchanged: no weight decay, no
Adam momentum carried over from an earlier stage. A tower's step count (bias correction,
lr schedule) advances while any of its parameters trains, so a wholly frozen tower resumes
where it stopped. Zeroing the gradient alone would not do that (momentum and decoupled
weight decay still move parameters), and `optax.masked` needs a static mask. Per tower a
`lax.switch` on the flags runs the plain update (all trainable), the update plus per-leaf
selects (some; the frozen gradients are zeroed first, so gradient clipping sees only the
trainable ones), or nothing (none: a frozen tower costs no optimizer work). Gradients are
always computed for every tower (the flags are dynamic). Because a partly frozen tower's
step count advances, a parameter unfrozen in a later stage starts with zero moments but
little bias correction (Adam: its first updates are up to ~3x larger than a fresh start's);
freeze whole towers across stages, or give such stages a warm-up, when that matters.

Differences from `recjax.train.step.make_train_step` (which takes `loss_fn(params, batch,
rng)` and has one optimizer state): the extra `controls` argument (replicated), per-tower
states, the masking, and per-tower norms in the metrics (`grad_norm/<tower>`,
`update_norm/<tower>`, `param_norm/<tower>`). Both share gradient accumulation
(`grad_accum`, `recjax.train.step.value_and_grad`); the joint step averages micro-batches
equally and, given `norms_fn`, normalises every loss term by the whole batch's count, which
makes accumulation exact (see `make_joint_train_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from recjax import sharding as shd
from recjax.train import optimizer as optim_lib
from recjax.train import state as state_lib
from recjax.train import step as step_lib
from recjax.train.state import TrainState

TOWERS = ("crm", "llm", "bridge")


class PerTower(NamedTuple):
  """An optax `GradientTransformation` (init, update) that also exposes its per-tower
  optimizers (`txs`), so the step can map trainable flags over each tower's state."""
  init: Callable
  update: Callable
  txs: Mapping[str, optax.GradientTransformation]


def per_tower(txs: Mapping[str, optax.GradientTransformation]) -> PerTower:
  """One optimizer per top-level key of the params; the state is {tower: state}."""
  txs = dict(txs)

  def init(params):
    _check(params)
    return {t: txs[t].init(params[t]) for t in txs}

  def update(updates, state, params=None):
    _check(updates)
    out, new_state = {}, {}
    for t in txs:
      out[t], new_state[t] = txs[t].update(
          updates[t], state[t], None if params is None else params[t])
    return out, new_state

  def _check(tree):
    if set(tree) != set(txs):
      raise ValueError(f"per_tower: params have towers {sorted(tree)}, optimizers "
                       f"{sorted(txs)}")

  return PerTower(init, update, txs)


def make_joint_optimizer(cfg, num_steps: int, towers=TOWERS,
                         tower_steps: Mapping[str, int] | None = None) -> PerTower:
  """`make_optimizer(cfg)` per tower; `cfg.tower_lr` ({tower: lr}) overrides the lr.

  Gradient clipping (`cfg.grad_clip`) is per tower. `tower_steps` ({tower: steps},
  `stages.tower_steps`): the steps each tower actually trains for; its schedule (warm-up,
  decay) spans those, since its step count only advances while it trains. Default: every
  tower's schedule spans `num_steps`.
  """
  tower_lr = dict(cfg.get("tower_lr", {}) or {})
  txs = {}
  for t in towers:
    c = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    if t in tower_lr:
      c.lr = tower_lr[t]
    steps = num_steps if tower_steps is None else tower_steps.get(t, num_steps)
    txs[t] = optim_lib.make_optimizer(c, max(int(steps), 1))
  return per_tower(txs)


def create_joint_train_state(init_params: Callable[[jax.Array], Any],
                             tx: optax.GradientTransformation, mesh: Mesh, rules,
                             rng: jax.Array, ema: bool = False,
                             compiler_options: dict | None = None):
  """Alias of `recjax.train.state.create_train_state` (kept for existing callers).

  The joint init traces the whole joint forward pass; tests compile it with cheap XLA
  options (3x faster on the CPU). Returns (state, state_sharding).
  """
  return state_lib.create_train_state(init_params, tx, mesh, rules, rng, ema=ema,
                                      compiler_options=compiler_options)


def _select(mask, new, old):
  """Per leaf: `new` where its flag is set, else `old` (mask: same tree, bool[] leaves)."""
  return jax.tree.map(lambda m, n, o: jnp.where(m, n, o), mask, new, old)


def _opt_state_mask(tx: optax.GradientTransformation, opt_state, mask):
  """The per-parameter flags mapped onto one tower's optimizer state.

  Parameter-shaped parts of the state (Adam moments, ...) take each parameter's flag;
  the rest (step counts, schedule state) advances when any parameter of the tower trains.
  """
  anyone = jnp.any(jnp.stack([jnp.asarray(m) for m in jax.tree.leaves(mask)] or
                             [jnp.asarray(False)]))
  return optax.tree_map_params(tx, lambda _, m: m, opt_state, mask,
                               transform_non_params=lambda _: anyone)


def _tower_update(tx, grads, opt_state, params, ema, mask, ema_decay: float):
  """One tower's optimizer update under dynamic per-parameter flags.

  A `lax.switch` on the flags picks one of three programs: every parameter trains (the
  plain optax update, no selects), some do (the frozen parameters' gradients are zeroed
  first, so a global-norm clip or a NaN there cannot touch the trainable ones; then the
  update, and a per-leaf `where` back to the old values for the frozen parameters, their
  optimizer moments and EMA), none does (no optimizer work; state passed through).
  Returns (params, opt_state, float32 norm of the applied update, ema).
  """
  flags = jnp.stack([jnp.asarray(m, bool) for m in jax.tree.leaves(mask)] or
                    [jnp.asarray(False)])
  norm = lambda tree: optax.tree.norm(tree).astype(jnp.float32)

  def ema_of(new_params):
    if ema is None:
      return None
    return jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), ema, new_params)

  def every(_):
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return new_params, new_opt, norm(updates), ema_of(new_params)

  def some(_):
    zero = lambda m, x: jnp.where(m, x, jnp.zeros_like(x))
    updates, new_opt = tx.update(jax.tree.map(zero, mask, grads), opt_state, params)
    new_params = _select(mask, optax.apply_updates(params, updates), params)
    new_opt = _select(_opt_state_mask(tx, new_opt, mask), new_opt, opt_state)
    new_ema = None if ema is None else _select(mask, ema_of(new_params), ema)
    return new_params, new_opt, norm(jax.tree.map(zero, mask, updates)), new_ema

  def none(_):
    return params, opt_state, jnp.zeros((), jnp.float32), ema

  branch = jnp.where(jnp.all(flags), 0, jnp.where(jnp.any(flags), 1, 2))
  return jax.lax.switch(branch, (every, some, none), None)


LossFn = Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]


def make_joint_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                          state_sharding: TrainState, mesh: Mesh,
                          ema_decay: float = 0.0,
                          compiler_options: dict | None = None,
                          grad_accum: int = 1, weight_key: str | None = None,
                          norms_fn: Callable[[dict], dict] | None = None):
  """Compiles `loss_fn(params, batch, rng, controls)` into one masked update.

  tx: a `per_tower` optimizer (`PerTower`; its state is {tower: state}). The state is donated,
  the batch sharded over the data-like axes, rng and controls replicated; the rng is folded
  with the step. compiler_options: passed to `jax.jit` (tests use cheap XLA options).
  grad_accum: micro-batches per step, scanned inside the one jit with one optimizer update
    (`recjax.train.step.value_and_grad`). weight_key: None (default) averages the
    micro-batches equally. The joint loss sums terms with different normalisers (CRM
    targets for L_crm, LLM rows for L_llm, L_kl, L_layer), so no single per-micro-batch
    weight makes every term exact. norms_fn: `batch -> {name: float32 count}` of the
    WHOLE batch (`JointTask.normalizers`); the step passes them, divided by grad_accum, to
    `loss_fn` as `controls["norms"]`, so each micro-batch's terms are its sums over the
    global count times grad_accum and their equal average is the full batch's loss and
    gradient exactly, for any masks (tested). Without it (None) each micro-batch
    normalises by its own counts: exact only when every micro-batch has the same numbers
    of valid CRM targets and LLM rows, otherwise the mean of micro-batch means.
    With title_mode "step" each micro-batch re-encodes the catalogue's titles (the
    encoding is inside `loss_fn`), so accumulation multiplies that cost by grad_accum.
  """
  if norms_fn is not None and weight_key is not None:
    raise ValueError("norms_fn already makes accumulation exact; weighting the micro-batches "
                     f"again by {weight_key!r} would not be: pass one or the other")

  def step(state: TrainState, batch: dict, rng: jax.Array, controls: dict):
    rng = jax.random.fold_in(rng, state.step)
    if norms_fn is not None:  # the whole batch's counts, shared by every micro-batch
      norms = {k: jnp.asarray(v, jnp.float32) / grad_accum for k, v in norms_fn(batch).items()}
      controls = {**controls, "norms": norms}
    (loss, aux), grads = step_lib.value_and_grad(
        loss_fn, state.params, batch, rng, controls, grad_accum=grad_accum, mesh=mesh,
        params_sharding=state_sharding.params, weight_key=weight_key)
    mask = controls["trainable"]
    if jax.tree.structure(mask) != jax.tree.structure(state.params):
      raise ValueError("controls['trainable'] must be a params-shaped tree of flags "
                       "(joint_task.trainable_mask)")
    params, opt_state, update_norm, ema = {}, {}, {}, {}
    for t in state.params:
      params[t], opt_state[t], update_norm[t], ema[t] = _tower_update(
          tx.txs[t], grads[t], state.opt_state[t], state.params[t],
          None if state.ema_params is None else state.ema_params[t], mask[t], ema_decay)
    # Norms per tower, each one pass over its tree; the global l2 norms follow from them.
    # A frozen parameter's gradient and update are discarded, so they count 0.
    norms = {}
    for t in state.params:
      norms[f"grad_norm/{t}"] = optax.tree.norm(
          jax.tree.map(lambda m, g: jnp.where(m, g, jnp.zeros_like(g)), mask[t], grads[t]))
      norms[f"update_norm/{t}"] = update_norm[t]
      norms[f"param_norm/{t}"] = optax.tree.norm(params[t])
    total = lambda kind: jnp.sqrt(sum(jnp.square(norms[f"{kind}/{t}"]) for t in state.params))
    metrics = {
        "loss": loss,
        **aux,
        **norms,
        "l2_grads": total("grad_norm"),
        "l2_params": total("param_norm"),
        "l2_updates": total("update_norm"),
    }
    ema = None if state.ema_params is None else ema
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  return jax.jit(
      step,
      in_shardings=(state_sharding, shd.batch_sharding(mesh),
                    shd.replicated(mesh), shd.replicated(mesh)),
      out_shardings=(state_sharding, shd.replicated(mesh)),
      donate_argnums=0, compiler_options=compiler_options)

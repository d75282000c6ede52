"""The one jitted update: `step(state, batch, rng) -> (state, metrics)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
import optax

from recjax import sharding as shd
from recjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    state_sharding: TrainState, mesh: Mesh,
                    ema_decay: float = 0.0):
  """Compiles `loss_fn(params, batch, rng) -> (loss, aux)` into one update.

  The state is donated, the batch is sharded over the data-like mesh axes,
  the rng is replicated and folded with the step, so a step is a pure function
  of (state, batch, rng) and replaying a step reproduces it exactly.
  metrics: the loss, every aux term, and the l2 norms of grads/params/updates.
  ema_decay: when the state keeps `ema_params`, they move towards the new
    params by (1 - ema_decay) each step.
  """
  def step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        **aux,
        "l2_grads": optax.tree.norm(grads),
        "l2_params": optax.tree.norm(params),
        "l2_updates": optax.tree.norm(updates),
    }
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: e + (1.0 - ema_decay) * (p - e), ema,
                         params)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  return jax.jit(
      step,
      in_shardings=(state_sharding, shd.batch_sharding(mesh),
                    shd.replicated(mesh)),
      out_shardings=(state_sharding, shd.replicated(mesh)),
      donate_argnums=0)

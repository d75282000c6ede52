"""The one jitted update: `step(state, batch, rng) -> (state, metrics)`.

Gradient accumulation (`grad_accum=k`, also used by `recjax.train.joint_step`): inside the
one jit the batch's leading axis B is split into k micro-batches of B/k rows, strided
(micro-batch i holds rows i, i + k, i + 2k, ...), so every device keeps its own rows and
the split moves no data: leaves become [k, B/k, ...] with the batch sharding on axis 1.
A `jax.lax.scan` runs forward + backward per micro-batch (rng `fold_in(rng, i)`), sums the
gradients in `accum_dtype` (float32 by default: 4 bytes per parameter of extra memory), and
the optimizer updates once.

Weighting (what is exact): the loss functions return means. When the aux has
`weight_key` (default "num_targets", the number of unmasked targets of a masked mean),
micro-batch i is weighted n_i / sum_j n_j: for a loss `sum_i total_i / sum_i n_i` (SASRec's
masked-mean CE or BCE) the accumulated loss and gradient equal the full-batch ones up to
float summation order, however the mask falls. (If no micro-batch has a target, the weights
fall back to 1/k.) Without the key, micro-batches are averaged equally, which is exact when
every micro-batch's normaliser is the same (e.g. no masked rows). Dropout masks and sampled
negatives depend on the rng and on the row's position in the micro-batch, so with dropout
on the k-step is a different (equally valid) random draw from the 1-step, not equal to it.
Aux metrics are combined with the same weights; `weight_key` itself is summed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from recjax import sharding as shd
from recjax.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def split_microbatches(batch: dict, k: int, mesh: Mesh) -> dict:
  """{name: x[B, ...]} -> {name: x[k, B/k, ...]}, micro-batch i = rows i::k.

  The strided split keeps every row on the device that holds it (axis 1 keeps the
  batch sharding). Raises if B is not divisible by k * (data x fsdp shards).
  """
  shards = shd.num_batch_shards(mesh)
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"grad_accum: batch leaves disagree on the batch size {sizes}")
  (b,) = sizes
  if b % k or (b // k) % shards:
    raise ValueError(f"grad_accum={k}: batch size {b} must divide into {k} micro-batches "
                     f"of a multiple of {shards} rows (the data x fsdp shards)")
  spec = NamedSharding(mesh, P(None, shd.batch_sharding(mesh).spec[0]))

  def split(x):
    x = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(split, batch)


def value_and_grad(loss_fn: LossFn, params, batch: dict, rng: jax.Array, *args,
                   grad_accum: int = 1, mesh: Mesh | None = None,
                   params_sharding: Any = None,
                   weight_key: str | None = "num_targets",
                   accum_dtype=jnp.float32):
  """((loss, aux), grads) of `loss_fn(params, batch, rng, *args)`, over `grad_accum`
  micro-batches when > 1 (see the module docstring for the weighting).

  grads have the params' dtypes. params_sharding: NamedShardings of the params, used to
  lay out the accumulator like the params.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    return vg(params, batch, rng, *args)
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
  k = grad_accum
  micro = split_microbatches(batch, k, mesh)
  first = jax.tree.map(lambda x: x[0], micro)
  (_, aux_shape), _ = jax.eval_shape(vg, params, first, rng, *args)
  weighted = weight_key is not None and weight_key in aux_shape

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, accum_dtype), params)
  if params_sharding is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, params_sharding)
  aux_zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)

  def body(carry, xs):
    g_sum, loss_sum, aux_sum, count_sum, n_sum = carry
    i, mb = xs
    (loss, aux), g = vg(params, mb, jax.random.fold_in(rng, i), *args)
    w = jnp.asarray(aux[weight_key], jnp.float32) if weighted else jnp.float32(1.0)
    loss = loss.astype(jnp.float32)
    g_sum = jax.tree.map(lambda s, x: s + w * x.astype(accum_dtype), g_sum, g)
    aux_sum = jax.tree.map(lambda s, a: s + w * jnp.asarray(a, jnp.float32), aux_sum, aux)
    count_sum = jax.tree.map(lambda s, a: s + jnp.asarray(a, jnp.float32), count_sum, aux)
    # Equal-weight sums for the fallback when no micro-batch has a target.
    return (g_sum, loss_sum + jnp.stack([w * loss, loss]), aux_sum, count_sum, n_sum + w), None

  init = (zeros, jnp.zeros((2,), jnp.float32), aux_zeros, aux_zeros, jnp.float32(0.0))
  (g_sum, loss_sum, aux_sum, count_sum, n_sum), _ = jax.lax.scan(
      body, init, (jnp.arange(k), micro))
  if weighted:
    # n_sum == 0 means every weight was 0: every micro-batch loss and gradient term is
    # then multiplied by 0, so fall back to the plain mean of the losses (the gradients
    # are those of a loss without targets: 0 for a pure masked mean).
    scale = jnp.where(n_sum > 0, 1.0 / jnp.maximum(n_sum, 1e-30), 0.0)
    loss = jnp.where(n_sum > 0, loss_sum[0] * scale, loss_sum[1] / k)
  else:
    scale = jnp.float32(1.0 / k)
    loss = loss_sum[1] / k
  grads = jax.tree.map(lambda s, p: (s * scale).astype(p.dtype), g_sum, params)
  aux = jax.tree.map(lambda s, a: (s * scale).astype(a.dtype), aux_sum, aux_shape)
  # Counts ("num_targets", "num_llm_rows", ...) add up over the micro-batches.
  for key in aux:
    if str(key).startswith("num_"):
      aux[key] = count_sum[key].astype(aux_shape[key].dtype)
  return (loss.astype(jnp.float32), aux), grads


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    state_sharding: TrainState, mesh: Mesh,
                    ema_decay: float = 0.0, grad_accum: int = 1,
                    weight_key: str | None = "num_targets",
                    compiler_options: dict | None = None):
  """Compiles `loss_fn(params, batch, rng) -> (loss, aux)` into one update.

  The state is donated, the batch is sharded over the data-like mesh axes,
  the rng is replicated and folded with the step, so a step is a pure function
  of (state, batch, rng) and replaying a step reproduces it exactly.
  metrics: the loss, every aux term, and the l2 norms of grads/params/updates.
  ema_decay: when the state keeps `ema_params`, they move towards the new
    params by (1 - ema_decay) each step.
  grad_accum: micro-batches per step (see the module docstring); the batch size must be a
    multiple of grad_accum x the data-like shards.
  compiler_options: passed to `jax.jit`.
  """
  def step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = value_and_grad(
        loss_fn, state.params, batch, rng, grad_accum=grad_accum, mesh=mesh,
        params_sharding=state_sharding.params, weight_key=weight_key)
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
      donate_argnums=0, compiler_options=compiler_options)

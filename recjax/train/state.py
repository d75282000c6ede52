"""Train state, built shapes-first and directly sharded on the mesh."""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from recjax import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array   # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  ema_params: Any = None  # exponential moving average of params, if enabled

  def eval_params(self) -> Any:
    """The parameters to evaluate: the moving average when it is kept."""
    return self.params if self.ema_params is None else self.ema_params


def _boxed_state_fn(init_params, tx, ema: bool):
  def boxed_state(r):
    params = init_params(r)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      ema_params=params if ema else None)
  return boxed_state


def abstract_train_state(init_params: Callable[[jax.Array], Any],
                         tx: optax.GradientTransformation, mesh: Mesh, rules,
                         ema: bool = False) -> tuple[TrainState, TrainState]:
  """The state's shapes and shardings, with nothing allocated.

  Returns (abstract state: a TrainState of `jax.ShapeDtypeStruct`s carrying their
  shardings, state_sharding: the same tree of `NamedSharding`s). `recjax.plan` lowers
  and compiles the step from these alone.
  """
  boxed_state = _boxed_state_fn(init_params, tx, ema)
  abstract = jax.eval_shape(boxed_state, jax.eval_shape(jax.random.key, 0))
  state_sharding = shd.logical_to_sharding(nn.get_partition_spec(abstract),
                                           mesh, rules)
  unboxed = nn.unbox(abstract)
  state_sharding = state_sharding.replace(opt_state=jax.tree.map(
      lambda x, s: _fit_sharding(x.shape, s, mesh), unboxed.opt_state,
      state_sharding.opt_state))
  return abstract_like(unboxed, state_sharding), state_sharding


def _fit_sharding(shape, sharding, mesh: Mesh):
  """`sharding`, or replicated where it does not fit `shape`.

  Optimizer states inherit their parameter's logical names through optax's tree maps,
  but a state leaf may have another shape: Adafactor's factored second moments drop an
  axis of the parameter (`v_row` [D] of a [D, F] kernel) and keep (1,) placeholders.
  Those leaves are O(rows + cols) small, so they are replicated.
  """
  spec = tuple(sharding.spec)
  if len(spec) > len(shape):
    return NamedSharding(mesh, P())
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if dim % math.prod(mesh.shape[a] for a in axes):
      return NamedSharding(mesh, P())
  return sharding


def create_train_state(init_params: Callable[[jax.Array], Any],
                       tx: optax.GradientTransformation, mesh: Mesh, rules,
                       rng: jax.Array, ema: bool = False,
                       compiler_options: dict | None = None
                       ) -> tuple[TrainState, TrainState]:
  """Initialises the state sharded by the logical axis rules.

  init_params: rng -> params as returned by `module.init(...)["params"]`, with
    logical-partitioning boxes. Nothing is materialised unsharded: shapes come
    from `jax.eval_shape`, shardings from the logical names, then the init runs
    under `jax.jit(..., out_shardings=...)`.
  ema: also keep an exponential moving average of the parameters.
  compiler_options: passed to the init's `jax.jit` (tests use cheap XLA options).
  Returns (state, state_sharding).
  """
  boxed_state = _boxed_state_fn(init_params, tx, ema)
  _, state_sharding = abstract_train_state(init_params, tx, mesh, rules, ema)
  init = jax.jit(lambda r: nn.unbox(boxed_state(r)),
                 out_shardings=state_sharding, compiler_options=compiler_options)
  return init(rng), state_sharding


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: restore targets for Orbax."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)

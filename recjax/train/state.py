"""Train state, built shapes-first and directly sharded on the mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
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


def create_train_state(init_params: Callable[[jax.Array], Any],
                       tx: optax.GradientTransformation, mesh: Mesh, rules,
                       rng: jax.Array, ema: bool = False
                       ) -> tuple[TrainState, TrainState]:
  """Initialises the state sharded by the logical axis rules.

  init_params: rng -> params as returned by `module.init(...)["params"]`, with
    logical-partitioning boxes. Nothing is materialised unsharded: shapes come
    from `jax.eval_shape`, shardings from the logical names, then the init runs
    under `jax.jit(..., out_shardings=...)`.
  ema: also keep an exponential moving average of the parameters.
  Returns (state, state_sharding).
  """
  def boxed_state(r):
    params = init_params(r)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      ema_params=params if ema else None)

  abstract = jax.eval_shape(boxed_state, rng)
  state_sharding = shd.logical_to_sharding(nn.get_partition_spec(abstract),
                                           mesh, rules)
  init = jax.jit(lambda r: nn.unbox(boxed_state(r)),
                 out_shardings=state_sharding)
  return init(rng), state_sharding


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: restore targets for Orbax."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)

"""Loss terms, each a small pure function with its shape contract.

Every function returns `(sum, count)` over the unmasked entries so that callers
can average exactly across positions, micro-batches and devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array, mask: Array
                          ) -> tuple[Array, Array]:
  """Full-softmax next-item loss; item 0 (padding) is never a valid answer.

  logits: float32[..., N + 1]; labels: int32[...]; mask: bool[...].
  """
  logits = logits.astype(jnp.float32).at[..., 0].set(-jnp.inf)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(mask, labels, 1))
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def sampled_binary_cross_entropy(pos_logits: Array, neg_logits: Array,
                                 mask: Array) -> tuple[Array, Array]:
  """The SASRec paper's loss: -log s(pos) - sum_j log(1 - s(neg_j)).

  pos_logits: float32[...]; neg_logits: float32[..., K]; mask: bool[...].
  """
  pos = -jax.nn.log_sigmoid(pos_logits.astype(jnp.float32))
  neg = -jnp.sum(jax.nn.log_sigmoid(-neg_logits.astype(jnp.float32)), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum((pos + neg) * mask), jnp.sum(mask)

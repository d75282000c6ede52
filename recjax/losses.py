"""Loss terms, each a small pure function with its shape contract.

Every function returns `(sum, count)` over the unmasked entries so that callers
can average exactly across positions, micro-batches and devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _weighted_sum(losses: Array, mask: Array, weights: Array | None
                  ) -> tuple[Array, Array]:
  """(sum of w * loss, sum of w) over the unmasked entries; w = 1 without weights."""
  w = mask.astype(jnp.float32)
  if weights is not None:
    w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
  return jnp.sum(losses * w), jnp.sum(w)


def softmax_cross_entropy(logits: Array, labels: Array, mask: Array,
                          label_smoothing: float = 0.0,
                          weights: Array | None = None
                          ) -> tuple[Array, Array]:
  """Full-softmax next-item loss; item 0 (padding) is never a valid answer.

  logits: float32[..., N + 1]; labels: int32[...]; mask: bool[...];
  weights: optional float32[...] per-entry loss weights (the count is then
  their sum over the unmasked entries).
  label_smoothing: eps in [0, 1): the target is (1 - eps) on the label plus
    eps / N on every item 1..N (padding excluded), i.e. the loss is
    (1 - eps) * nll + eps * mean_i(-log p_i).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
  logits = jnp.asarray(logits, jnp.float32).at[..., 0].set(-jnp.inf)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(mask, labels, 1))
  if label_smoothing:
    uniform = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[..., 1:], axis=-1)
    losses = (1.0 - label_smoothing) * losses + label_smoothing * uniform
  return _weighted_sum(losses, mask, weights)


def sampled_binary_cross_entropy(pos_logits: Array, neg_logits: Array,
                                 mask: Array, weights: Array | None = None
                                 ) -> tuple[Array, Array]:
  """The SASRec paper's loss: -log s(pos) - sum_j log(1 - s(neg_j)).

  pos_logits: float32[...]; neg_logits: float32[..., K]; mask: bool[...];
  weights: optional float32[...] as in `softmax_cross_entropy`.
  """
  pos = -jax.nn.log_sigmoid(pos_logits.astype(jnp.float32))
  neg = -jnp.sum(jax.nn.log_sigmoid(-neg_logits.astype(jnp.float32)), axis=-1)
  return _weighted_sum(pos + neg, mask, weights)

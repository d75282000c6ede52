"""CRM-confidence routing (CoReLLa): send the samples the CRM is least sure about to the LLM.

The CRM's uncertainty on a sample is the entropy of its next-item distribution (softmax over
items 1..N; column 0 = padding is excluded); for a CTR model it would be the binary entropy
`-p log p - (1 - p) log(1 - p)` of the click probability (`binary_entropy`). At a target LLM
fraction f of n samples, the round(f * n) most uncertain ones go to the LLM (ties broken by
sample index, so the split is deterministic); the rest keep the CRM's answer. The fraction
is taken over the whole evaluated set, not per batch. f = 0 gives exactly the CRM's scores,
f = 1 exactly the LLM's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recjax import metrics as metrics_lib

Array = jax.Array


def next_item_entropy(logits: Array, exclude: Array | None = None) -> Array:
  """float[B, N + 1] next-item logits -> float32[B] entropy (nats) over items 1..N.

  exclude: optional bool[B, N + 1], items left out of the distribution (those the ranking
  removes, e.g. the history). -inf logits are items of probability 0 (they add 0, not NaN).
  """
  logits = logits.astype(jnp.float32)
  if exclude is not None:
    logits = jnp.where(exclude, -jnp.inf, logits)
  log_p = jax.nn.log_softmax(logits[..., 1:], axis=-1)
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def binary_entropy(p: Array) -> Array:
  """float[B] click probabilities -> float32[B] binary entropy (nats)."""
  p = jnp.clip(jnp.asarray(p, jnp.float32), 1e-7, 1.0 - 1e-7)
  return -p * jnp.log(p) - (1.0 - p) * jnp.log1p(-p)


def route_to_llm(uncertainty: Array, llm_fraction: float | Array) -> Array:
  """bool[B]: True for the round(f * B) most uncertain samples (ties: lower index first)."""
  n = uncertainty.shape[0]
  k = jnp.round(jnp.asarray(llm_fraction, jnp.float32) * n).astype(jnp.int32)
  order = jnp.argsort(-uncertainty, stable=True)            # most uncertain first
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank < k


def routed_scores(crm_scores: Array, llm_scores: Array, to_llm: Array) -> Array:
  """float[B, V] each, bool[B] -> float[B, V]: the LLM's row where routed, else the CRM's."""
  return jnp.where(to_llm[:, None], llm_scores, crm_scores)


def routing_curve(crm_scores: Array, llm_scores: Array, targets: Array,
                  fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.5, 1.0),
                  ks: Sequence[int] = (5, 10, 20), exclude: Array | None = None,
                  uncertainty: Array | None = None) -> list[dict[str, float]]:
  """Full-ranking metrics as a function of the LLM fraction.

  crm_scores, llm_scores: float32[B, N + 1] over the whole evaluated set; targets int32[B];
  exclude: optional bool[B, N + 1] (e.g. history items) as `metrics.target_ranks`;
  uncertainty: float[B], default the CRM's next-item entropy over the items that are
    ranked (without `exclude`'s).
  Returns one dict per fraction: {"llm_fraction", "routed", "hr@k", "ndcg@k", "mrr@k",
  and each metric's standard error over users "hr@k_se", ...}.
  """
  if uncertainty is None:
    uncertainty = next_item_entropy(crm_scores, exclude)
  out = []
  for f in fractions:
    to_llm = route_to_llm(uncertainty, f)
    ranks = metrics_lib.target_ranks(routed_scores(crm_scores, llm_scores, to_llm),
                                     targets, exclude)
    row = metrics_lib.finalize(jax.tree.map(
        np.asarray, metrics_lib.ranking_metrics(ranks, ks, with_squares=True)))
    out.append({"llm_fraction": float(f), "routed": int(jnp.sum(to_llm)), **row})
  return out

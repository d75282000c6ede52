"""The sequential-recommendation task: SASRec's loss and catalogue scores."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from recjax import losses
from recjax.models.sasrec import SASRec, SASRecConfig


@dataclasses.dataclass(frozen=True)
class SequentialTask:
  """Binds a SASRec to its loss; all methods are pure and jittable.

  loss_type: "ce" (full softmax over the catalogue, default) or "bce" (the
    paper's binary cross-entropy with `num_negatives` uniformly sampled
    negatives per position; a sampled negative may rarely equal the target).
  label_smoothing: "ce" only; see `recjax.losses.softmax_cross_entropy`.
  """
  model_cfg: SASRecConfig
  loss_type: str = "ce"
  num_negatives: int = 1
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.loss_type not in ("ce", "bce"):
      raise ValueError(f"loss.type: unknown {self.loss_type!r} (ce, bce)")
    if self.model_cfg.history_bias and self.loss_type != "ce":
      raise ValueError("model.history_bias needs loss.type='ce' (full-catalogue logits)")
    if self.label_smoothing and self.loss_type != "ce":
      raise ValueError("loss.label_smoothing needs loss.type='ce'")

  @property
  def model(self) -> SASRec:
    return SASRec(self.model_cfg)

  def init(self, rng: jax.Array):
    """Boxed params (with logical axis names)."""
    dummy = jnp.zeros((1, self.model_cfg.max_len), jnp.int32)
    return self.model.init(rng, dummy)["params"]

  def loss(self, params, batch: dict, rng: jax.Array):
    """batch: inputs int32[B, L], labels int32[B, S], mask bool[B, S] and
    optionally weights float32[B, S] (a weighted mean; aux "num_targets" is
    then the sum of the weights, the mean's denominator, which is what
    gradient accumulation weights micro-batches by)."""
    dropout_rng, negative_rng = jax.random.split(rng)
    model = self.model
    s = batch["labels"].shape[1]
    hidden = model.apply({"params": params}, batch["inputs"], deterministic=False,
                         num_outputs=s, rngs={"dropout": dropout_rng})   # [B, S, D]
    if self.loss_type == "ce":
      logits = model.apply({"params": params}, hidden, method=SASRec.score,
                           history_ids=batch["inputs"])
      total, count = losses.softmax_cross_entropy(
          logits, batch["labels"], batch["mask"], self.label_smoothing,
          batch.get("weights"))
    else:
      table = params["item_embedding"]["embedding"]
      negatives = jax.random.randint(
          negative_rng, batch["labels"].shape + (self.num_negatives,), 1,
          self.model_cfg.num_items + 1)
      pos = jnp.einsum("bsd,bsd->bs", hidden, table[batch["labels"]])
      neg = jnp.einsum("bsd,bskd->bsk", hidden, table[negatives])
      total, count = losses.sampled_binary_cross_entropy(
          pos, neg, batch["mask"], batch.get("weights"))
    loss = total / jnp.maximum(count, 1.0)
    return loss, {f"loss_{self.loss_type}": loss, "num_targets": count}

  def scores(self, params, histories: jax.Array) -> jax.Array:
    """int32[B, L] -> float32[B, N + 1] next-item scores (item 0 = padding)."""
    return self.model.apply({"params": params}, histories,
                            method=SASRec.scores)

"""The joint objective: `w_crm*L_crm + w_llm*L_llm + w_kl*L_kl + w_layer*L_layer`.

`JointTask.loss(params, batch, rng, controls) -> (loss, metrics)` is pure and jittable. The
loss weights are *inputs* (`controls["weights"]`, float32 scalars), so changing a stage's
weights never recompiles; every term is always computed (a zero weight only zeroes its
gradient), which is the price of one compiled program for all stages.

Terms (B rows, S CRM targets per row, N items; item 0 = padding is never a label):
  L_crm    SASRec full-softmax cross-entropy over the bridged item table, batch["labels"]
           int32[B, S] where batch["mask"] bool[B, S].
  L_llm    item-softmax cross-entropy of the LLM head (T5 decoder state at the start token
           . bridged items in T5 width) on batch["target"] int32[B] where
           batch["target_mask"] bool[B].
  L_kl     KL between the CRM's next-item distribution (last position) and the LLM's, both
           at temperature `kl_temperature`; `kl_direction` "crm_llm" = KL(p_crm || p_llm)
           (the CRM teaches), "llm_crm" = KL(p_llm || p_crm); `kl_stop_grad` names the side
           whose logits get no gradient ("crm", "llm" or "none").
  L_layer  CoReLLa: sum over `bridge.align_pairs` of ||g_llm(h_llm) - g_crm(h_crm)||_2^p,
           each h mean-pooled over valid positions, averaged over rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from recjax import losses
from recjax.models.joint import JointConfig, JointModel

Array = jax.Array

LOSS_TERMS = ("crm", "llm", "kl", "layer")
_NEG = -1e9   # finite "minus infinity" for the padding column (keeps 0 * log 0 = 0)


def _log_probs(logits: Array, temperature: float) -> Array:
  logits = logits.astype(jnp.float32).at[..., 0].set(_NEG)
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def kl_divergence(crm_logits: Array, llm_logits: Array, mask: Array, *,
                  direction: str = "crm_llm", stop_grad: str = "crm",
                  temperature: float = 1.0) -> tuple[Array, Array]:
  """Masked KL between two item distributions; returns (sum, count) like `losses`.

  crm_logits, llm_logits: float32[B, N + 1] (column 0 = padding, excluded); mask: bool[B].
  """
  if stop_grad == "crm":
    crm_logits = jax.lax.stop_gradient(crm_logits)
  elif stop_grad == "llm":
    llm_logits = jax.lax.stop_gradient(llm_logits)
  elif stop_grad != "none":
    raise ValueError(f"kl_stop_grad: unknown {stop_grad!r} (crm, llm, none)")
  log_crm = _log_probs(crm_logits, temperature)
  log_llm = _log_probs(llm_logits, temperature)
  if direction == "crm_llm":
    log_p, log_q = log_crm, log_llm
  elif direction == "llm_crm":
    log_p, log_q = log_llm, log_crm
  else:
    raise ValueError(f"kl_direction: unknown {direction!r} (crm_llm, llm_crm)")
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)     # [B]
  mask = mask.astype(jnp.float32)
  return jnp.sum(kl * mask), jnp.sum(mask)


def layer_alignment(pairs, mask: Array, p: float = 2.0) -> tuple[Array, Array]:
  """sum_j ||a_j - b_j||_2^p per row, masked; pairs: [(float[B, A], float[B, A])]."""
  mask = mask.astype(jnp.float32)
  if not pairs:
    return jnp.zeros((), jnp.float32), jnp.sum(mask)
  per_row = 0.0
  for a, b in pairs:
    sq = jnp.sum(jnp.square((a - b).astype(jnp.float32)), axis=-1)
    per_row = per_row + (sq if p == 2.0 else (sq + 1e-12) ** (p / 2.0))
  return jnp.sum(per_row * mask), jnp.sum(mask)


def stage_controls(weights: dict[str, float], trainable: dict[str, bool],
                   catalogue: dict | None = None) -> dict:
  """The step's `controls` pytree: float32 weights, bool trainable flags, catalogue.

  Always the same structure and dtypes, so every stage reuses one compiled step.
  """
  unknown = set(weights) - set(LOSS_TERMS)
  if unknown:
    raise ValueError(f"unknown loss weights {sorted(unknown)}; known {LOSS_TERMS}")
  return {
      "weights": {k: jnp.asarray(weights.get(k, 0.0), jnp.float32) for k in LOSS_TERMS},
      "trainable": {t: jnp.asarray(bool(trainable.get(t, False)))
                    for t in ("crm", "llm", "bridge")},
      "catalogue": {} if catalogue is None else dict(catalogue),
  }


@dataclasses.dataclass(frozen=True)
class JointTask:
  """Binds a `JointModel` to the joint objective; all methods are pure and jittable."""
  cfg: JointConfig
  kl_direction: str = "crm_llm"
  kl_stop_grad: str = "crm"
  kl_temperature: float = 1.0
  align_p: float = 2.0

  @property
  def model(self) -> JointModel:
    return JointModel(self.cfg)

  def dummy_inputs(self, prompt_len: int = 4, title_len: int = 4):
    b, l, n = 1, self.cfg.crm.max_len, self.cfg.num_rows
    batch = {"inputs": jnp.ones((b, l), jnp.int32),
             "llm_input_ids": jnp.ones((b, prompt_len), jnp.int32),
             "llm_input_mask": jnp.ones((b, prompt_len), bool),
             "llm_item_ids": jnp.zeros((b, prompt_len), jnp.int32),
             "user_ids": jnp.zeros((b,), jnp.int32)}
    if self.cfg.title_mode == "cache":
      catalogue = {"title_table": jnp.zeros((n, self.cfg.llm.d_model), jnp.float32)}
    else:
      catalogue = {"title_ids": jnp.ones((n, title_len), jnp.int32),
                   "title_mask": jnp.ones((n, title_len), bool)}
    return batch, catalogue

  def init(self, rng: jax.Array):
    """Boxed params {"crm", "llm", "bridge"} with logical axis names."""
    batch, catalogue = self.dummy_inputs()
    return self.model.init(rng, batch, catalogue)["params"]

  def loss(self, params, batch: dict, rng: jax.Array, controls: dict):
    """(loss, metrics); see the module docstring for the batch and the terms."""
    w = controls["weights"]
    s = batch["labels"].shape[1]
    out = self.model.apply({"params": params}, batch, controls["catalogue"],
                           deterministic=False, num_targets=s, rngs={"dropout": rng})
    terms = {}
    total, count = losses.softmax_cross_entropy(out["crm_logits"], batch["labels"],
                                                batch["mask"])
    terms["crm"] = total / jnp.maximum(count, 1.0)
    row_mask = batch["target_mask"]
    total, rows = losses.softmax_cross_entropy(out["llm_logits"], batch["target"], row_mask)
    terms["llm"] = total / jnp.maximum(rows, 1.0)
    total, _ = kl_divergence(out["crm_next"], out["llm_logits"], row_mask,
                             direction=self.kl_direction, stop_grad=self.kl_stop_grad,
                             temperature=self.kl_temperature)
    terms["kl"] = total / jnp.maximum(rows, 1.0)
    total, _ = layer_alignment(out["align"], row_mask, self.align_p)
    terms["layer"] = total / jnp.maximum(rows, 1.0)
    loss = sum(w[k] * terms[k] for k in LOSS_TERMS)
    metrics = {f"loss_{k}": v for k, v in terms.items()}
    metrics.update({f"weight_{k}": w[k] for k in LOSS_TERMS})
    metrics["num_targets"] = count
    return loss, metrics

  def encode_titles(self, params, title_ids: Array, title_mask: Array) -> Array:
    """float[N + 1, Dl] title table for title_mode "cache" (refresh it from the loop)."""
    return self.model.apply({"params": params}, title_ids, title_mask,
                            method=JointModel.encode_titles)

  def scores(self, params, batch: dict, catalogue: dict) -> tuple[Array, Array]:
    """(CRM, LLM) next-item scores float32[B, N + 1] each."""
    return self.model.apply({"params": params}, batch, catalogue,
                            method=JointModel.scores)

  def crm_scores(self, params, histories: Array, catalogue: dict) -> Array:
    return self.model.apply({"params": params}, histories, catalogue,
                            method=JointModel.crm_scores)


def tower_norms(tree: dict, prefix: str) -> dict[str, Array]:
  """{f"{prefix}/{tower}": l2 norm} for every top-level key of a params-like tree."""
  return {f"{prefix}/{k}": optax.tree.norm(v) for k, v in tree.items()}


def build_joint_task(config, num_items: int) -> JointTask:
  """A `JointTask` from an experiment config (see experiments/joint_ml100k.py).

  Precision (strings "float32" | "bfloat16"; default float32): `crm.dtype` SASRec's
  activations; `llm.dtype` T5's activations, `llm.param_dtype` T5's parameters (and so its
  gradients and Adam moments). Logits and losses are float32 in every case; the bridge
  stays float32.
  """
  from recjax.models.bridge import BridgeConfig
  from recjax.models.sasrec import SASRecConfig
  from recjax.models.t5 import T5Config

  def check_dtypes(cfg: dict, section: str, keys) -> dict:
    for key in keys:
      if key in cfg:
        if str(cfg[key]) not in ("float32", "bfloat16"):
          raise ValueError(f"{section}.{key}: unknown {cfg[key]!r} (float32, bfloat16)")
        cfg[key] = jnp.dtype(cfg[key])
    return cfg

  crm = SASRecConfig(num_items=num_items,
                     **check_dtypes(config.crm.to_dict(), "crm", ("dtype",)))
  llm_cfg = check_dtypes(config.llm.to_dict(), "llm", ("dtype", "param_dtype"))
  preset = llm_cfg.pop("preset")
  llm_cfg.pop("checkpoint", None)
  llm = T5Config.preset(preset, **llm_cfg)
  bridge_cfg = config.bridge.to_dict()
  title_mode = bridge_cfg.pop("title_mode", "step")
  bridge_cfg["align_pairs"] = tuple(tuple(p) for p in bridge_cfg.get("align_pairs", ()))
  bridge = BridgeConfig(**bridge_cfg)
  return JointTask(JointConfig(crm, llm, bridge, title_mode=title_mode),
                   kl_direction=config.loss.kl_direction,
                   kl_stop_grad=config.loss.kl_stop_grad,
                   kl_temperature=config.loss.kl_temperature,
                   align_p=config.loss.align_p)

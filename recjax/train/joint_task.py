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
           h_llm mean-pooled over the encoder's valid positions, h_crm the SASRec state
           after the last item (`bridge.align_crm_pool="last"`, default) or mean-pooled over
           the window (`"mean"`, the behaviour before session 5), averaged over rows.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from recjax import losses
from recjax.models.joint import JointConfig, JointModel
from recjax.models.t5 import T5

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


def param_path(path) -> str:
  """A `jax.tree_util` key path as "crm/block_0/mlp/wi/kernel"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def trainable_mask(trainable: dict[str, bool], params) -> Any:
  """Per-parameter trainable flags from path patterns: a params-shaped tree of bool[].

  trainable: {pattern: flag}. A pattern is a tower name or a parameter-path prefix ending at
  a "/" boundary ("crm", "bridge/crm_to_llm"; not "llm/enc") or a regular expression
  matched against the whole path ("llm/.*/SelfAttention/.*"). For each parameter the *last* matching pattern decides;
  a parameter no pattern matches is frozen. So {"llm": True, "llm/lm_head": False} trains
  T5 except its token head. A pattern that matches no parameter is an error (a typo must
  not silently freeze or train the wrong thing), unless it starts with "?" (an optional
  part: "?llm/lm_head" is absent from a T5 with tied embeddings).
  params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s; only paths are read).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))
  paths = [param_path(p) for p, _ in leaves]
  flags = [False] * len(paths)
  for pattern, flag in trainable.items():
    optional = pattern.startswith("?")
    pattern = pattern[1:] if optional else pattern
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"trainable pattern {pattern!r} is not a valid regular expression: "
                       f"{e}") from None
    hits = [i for i, path in enumerate(paths)
            if path == pattern or path.startswith(pattern + "/") or regex.fullmatch(path)]
    if not hits and not optional:
      towers = sorted({path.split("/")[0] for path in paths})
      raise ValueError(f"trainable pattern {pattern!r} matches no parameter (towers "
                       f"{towers}; paths look like {paths[0]!r})")
    for i in hits:
      flags[i] = bool(flag)
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(f) for f in flags])


def stage_controls(weights: dict[str, float], trainable: dict[str, bool], params,
                   catalogue: dict | None = None) -> dict:
  """The step's `controls` pytree: float32 weights, per-parameter bool trainable flags
  (`trainable_mask(trainable, params)`), the catalogue.

  Always the same structure and dtypes, so every stage reuses one compiled step.
  """
  unknown = set(weights) - set(LOSS_TERMS)
  if unknown:
    raise ValueError(f"unknown loss weights {sorted(unknown)}; known {LOSS_TERMS}")
  return {
      "weights": {k: jnp.asarray(weights.get(k, 0.0), jnp.float32) for k in LOSS_TERMS},
      "trainable": trainable_mask(dict(trainable), params),
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

  @staticmethod
  def normalizers(batch: dict) -> dict:
    """The loss terms' counts over a batch: CRM targets and LLM rows (float32 scalars);
    `make_joint_train_step(norms_fn=...)` takes them from the whole batch."""
    return {"crm": jnp.sum(batch["mask"].astype(jnp.float32)),
            "rows": jnp.sum(batch["target_mask"].astype(jnp.float32))}

  def loss(self, params, batch: dict, rng: jax.Array, controls: dict):
    """(loss, metrics); see the module docstring for the batch and the terms.

    Each term is a sum over the batch's valid targets (CRM) or rows (LLM, KL, alignment)
    divided by its count: this batch's own, or `controls["norms"]` when the step passes
    the whole batch's (gradient accumulation, `make_joint_train_step(norms_fn=...)`).
    """
    w = controls["weights"]
    s = batch["labels"].shape[1]
    out = self.model.apply({"params": params}, batch, controls["catalogue"],
                           deterministic=False, num_targets=s, rngs={"dropout": rng})
    own = self.normalizers(batch)
    norms = controls.get("norms", own)
    den = {k: jnp.where(norms[k] > 0, norms[k], 1.0) for k in own}
    terms = {}
    total, count = losses.softmax_cross_entropy(out["crm_logits"], batch["labels"],
                                                batch["mask"])
    terms["crm"] = total / den["crm"]
    row_mask = batch["target_mask"]
    total, _ = losses.softmax_cross_entropy(out["llm_logits"], batch["target"], row_mask)
    terms["llm"] = total / den["rows"]
    total, _ = kl_divergence(out["crm_next"], out["llm_logits"], row_mask,
                             direction=self.kl_direction, stop_grad=self.kl_stop_grad,
                             temperature=self.kl_temperature)
    terms["kl"] = total / den["rows"]
    total, _ = layer_alignment(out["align"], row_mask, self.align_p)
    terms["layer"] = total / den["rows"]
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

  def generate(self, params, batch: dict, catalogue: dict, index: "TitleIndex", *,
               num_beams: int = 10, length_penalty: float = 1.0
               ) -> tuple[np.ndarray, Array, Array]:
    """Recommends by generating item titles: constrained beam search over the catalogue.

    The T5 encoder reads the same prompt as the item head (soft prompts from SASRec's
    user state, item tokens, text); the decoder and T5's token head (`lm_head`, or the
    tied embeddings) generate, and the title trie (`index.trie`) allows only catalogue
    titles. A from-scratch T5 learns nothing for its token head from the item losses, so
    this is for an LLM with a text head (a FLAN-T5 checkpoint, or trained on titles).
    Returns (items int32[B, num_beams] item ids by rank (0 = none), titles int32[B,
    num_beams, Lt], beam scores float32[B, num_beams]).
    """
    from recjax import decoding  # pylint: disable=g-import-not-at-top
    if not self.cfg.text_head and not self.cfg.llm.tie_word_embeddings:
      raise ValueError("generate needs T5's token head: set llm.text_head=True")
    if index.eos_id != self.cfg.llm.eos_token_id:
      raise ValueError(f"TitleIndex eos_id {index.eos_id} != T5 eos_token_id "
                       f"{self.cfg.llm.eos_token_id}")
    x, mask = self.model.apply({"params": params}, batch, catalogue,
                               method=JointModel.generation_inputs)
    tokens, scores = decoding.generate(
        T5(self.cfg.llm), params["llm"], None, mask, inputs_embeds=x,
        max_decode_len=int(index.trie.max_len), method="beam", num_beams=num_beams,
        length_penalty=length_penalty, trie=index.trie, return_all_beams=True)
    return index.rank(np.asarray(tokens), num_beams), tokens, scores


@dataclasses.dataclass(frozen=True)
class TitleIndex:
  """Catalogue titles for constrained decoding: a trie and title -> item ids.

  Items with the same title share one trie path; a generated title stands for all of
  them (in item-id order). Items without title tokens cannot be generated:
  `untitled` counts them.
  """
  trie: Any                                      # recjax.trie.Trie
  items_of: dict[tuple[int, ...], tuple[int, ...]]
  eos_id: int
  untitled: int

  @classmethod
  def build(cls, title_ids: np.ndarray, title_mask: np.ndarray, eos_id: int = 1
            ) -> "TitleIndex":
    """title_ids int32[N + 1, Tt], title_mask bool[N + 1, Tt] (row 0 = padding)."""
    from recjax import trie as trie_lib  # pylint: disable=g-import-not-at-top
    title_ids, title_mask = np.asarray(title_ids), np.asarray(title_mask, bool)
    items_of: dict[tuple[int, ...], list[int]] = {}
    untitled = 0
    for item in range(1, title_ids.shape[0]):
      seq = tuple(int(t) for t in title_ids[item][title_mask[item]])
      if seq and seq[-1] == eos_id:
        seq = seq[:-1]
      if not seq:
        untitled += 1
        continue
      items_of.setdefault(seq, []).append(item)
    if not items_of:
      raise ValueError("TitleIndex: no item has a title")
    trie = trie_lib.build_trie(list(items_of), eos_id=eos_id)
    return cls(trie, {k: tuple(v) for k, v in items_of.items()}, eos_id, untitled)

  def title(self, tokens) -> tuple[int, ...]:
    """Generated int32[Lt] (eos, then padding) -> the title's tokens."""
    out = []
    for t in np.asarray(tokens).tolist():
      if t == self.eos_id:
        break
      out.append(int(t))
    return tuple(out)

  def rank(self, tokens: np.ndarray, k: int) -> np.ndarray:
    """int32[B, beams, Lt] generated titles -> int32[B, k] items by rank (0 = none)."""
    out = np.zeros((tokens.shape[0], k), np.int32)
    for b in range(tokens.shape[0]):
      ranked: list[int] = []
      for beam in tokens[b]:
        for item in self.items_of.get(self.title(beam), ()):
          if item not in ranked:
            ranked.append(item)
      out[b, :min(k, len(ranked))] = ranked[:k]
    return out


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
  if crm.history_bias:
    raise ValueError("crm.history_bias: not supported by the joint model (its CRM and LLM "
                     "heads score without the window); use it with the SASRec task")
  llm_cfg = check_dtypes(config.llm.to_dict(), "llm", ("dtype", "param_dtype"))
  preset = llm_cfg.pop("preset")
  llm_cfg.pop("checkpoint", None)
  if not llm_cfg.get("vocab_size", 0):       # 0 / absent: the preset's vocabulary
    llm_cfg.pop("vocab_size", None)
  text_head = bool(llm_cfg.pop("text_head", True))
  llm = T5Config.preset(preset, **llm_cfg)
  bridge_cfg = config.bridge.to_dict()
  title_mode = bridge_cfg.pop("title_mode", "step")
  bridge_cfg["align_pairs"] = tuple(tuple(p) for p in bridge_cfg.get("align_pairs", ()))
  bridge = BridgeConfig(**bridge_cfg)
  return JointTask(JointConfig(crm, llm, bridge, title_mode=title_mode, text_head=text_head),
                   kl_direction=config.loss.kl_direction,
                   kl_stop_grad=config.loss.kl_stop_grad,
                   kl_temperature=config.loss.kl_temperature,
                   align_p=config.loss.align_p)

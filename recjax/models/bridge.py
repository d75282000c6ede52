"""The knowledge bridge between the CRM (SASRec) and the LLM (T5).

Every direction is a submodule that exists only when its `BridgeConfig` switch is on, so
switching a direction off removes exactly its parameters:

  memory       (always) the information-sharing module: a learnable item memory
               `item_memory: float[V_items, M]` (and, with `user_memory`, `user_memory:
               float[U + 1, M]`) read by both models through `to_crm: [M, Dc]` and
               `to_llm: [M, Dl]`. The CRM adds `to_crm(memory[i])` to its item embeddings;
               the LLM reads it through item tokens and the recommendation head, so both
               losses write into the same rows.
  crm_to_llm   the SASRec user state (last position) -> `num_soft_prompts` vectors of T5
               width, prepended to the T5 encoder input (DELRec / BDLM soft prompts); with
               user memory, `to_llm(user_memory[u])` is added to every prompt vector.
  item_tokens  a prompt position whose `llm_item_ids` entry is i > 0 is embedded as
               `to_llm(memory[i]) + item_type` instead of the T5 token embedding (no
               vocabulary extension; the token id at that position is ignored).
  llm_to_crm   T5 encodings of item titles (mean-pooled encoder output, `title_table:
               float[N + 1, Dl]`) -> `title_proj` to CRM width, fused by a per-item,
               per-feature gate `g = sigmoid([e_crm, t] @ W_g + b)` into the CRM's item
               embeddings: `e_i + to_crm(memory[i]) + g * t`.
  llm_head     (always) bridged CRM item embeddings projected to T5 width plus the
               memory's T5 view: `e_llm[i] = head_proj(e_bridged[i]) + to_llm(memory[i])`;
               the T5 decoder state at the start token dotted with `e_llm` gives logits
               over the whole catalogue in one matmul.
  align        one pair of projections `g_llm: [Dl, A]`, `g_crm: [Dc, A]` per entry of
               `align_pairs` (CoReLLa layer-wise alignment).

Every matmul is 2-D ([rows, D] @ [D, F]); on the CPU a 3-D input matmul's gradient is ~4x
slower.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
  """Which bridge directions exist, and their sizes."""
  memory_dim: int = 64            # M: width of the shared item/user memory
  user_memory: bool = False       # also keep a user memory (needs num_users)
  num_users: int = 0              # users 1..num_users, 0 = unknown
  crm_to_llm: bool = True         # SASRec user state -> soft prompts for the T5 encoder
  num_soft_prompts: int = 4       # k
  item_tokens: bool = True        # item placeholders embedded from the memory
  llm_to_crm: bool = True         # T5 title encodings -> gated into SASRec item embeddings
  gate_bias_init: float = 0.0     # initial gate logit (0 -> gate 0.5)
  # (T5 encoder hidden index in 0..L (0 = embeddings), SASRec block index) per pair.
  align_pairs: tuple[tuple[int, int], ...] = ()
  align_dim: int = 32             # A: width of the alignment space
  # SASRec side of an alignment pair: "mean" over the window's real positions, or "last":
  # the state after the last item (the user state that predicts the next item, what the
  # prompt describes too). "last" lets SASRec's last block run at the scored positions only.
  align_crm_pool: str = "last"
  init_std: float = 0.02
  # False: the LLM head, the item tokens and the soft prompts read the bridged item table,
  # the shared item memory and the SASRec user state through a stop-gradient, so the LLM
  # losses (item CE, KL) do not reach SASRec or the memory; `to_llm`, the head and T5 still
  # learn. The CoReLLa alignment loss, when weighted, still trains both sides (its purpose).
  llm_grad_to_crm: bool = True

  def __post_init__(self):
    if self.user_memory and self.num_users <= 0:
      raise ValueError("bridge.user_memory needs num_users > 0")
    if self.crm_to_llm and self.num_soft_prompts <= 0:
      raise ValueError("bridge.crm_to_llm needs num_soft_prompts > 0")
    if self.align_crm_pool not in ("mean", "last"):
      raise ValueError(f"bridge.align_crm_pool: unknown {self.align_crm_pool!r} (mean, last)")


def _kernel(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _dense(features, axes, std, name, use_bias=False, bias_init=0.0):
  return nn.Dense(
      features, use_bias=use_bias, name=name, kernel_init=_kernel(std, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.constant(bias_init),
                                             axes[1:]))


class Memory(nn.Module):
  """Shared item (and user) memory with projections into both models' widths."""
  cfg: BridgeConfig
  num_item_rows: int   # rows of the item memory (the CRM's item vocabulary)
  crm_dim: int
  llm_dim: int

  def setup(self):
    cfg = self.cfg
    self.item_memory = self.param("item_memory", _kernel(cfg.init_std, ("items", None)),
                                  (self.num_item_rows, cfg.memory_dim))
    if cfg.user_memory:
      self.user_memory = self.param("user_memory", _kernel(cfg.init_std, (None, None)),
                                    (cfg.num_users + 1, cfg.memory_dim))
    self.to_crm = _dense(self.crm_dim, (None, "embed"), cfg.init_std, "to_crm")
    self.to_llm = _dense(self.llm_dim, (None, "embed"), cfg.init_std, "to_llm")

  def items(self, num_rows: int) -> Array:
    """float[num_rows, M]: the first rows of the item memory."""
    return self.item_memory[:num_rows]

  def crm_items(self, num_rows: int) -> Array:
    """float[num_rows, Dc]: the memory's CRM view; row 0 (padding) is zero."""
    out = self.to_crm(self.items(num_rows))
    return out.at[0].set(0.0)

  def llm_items(self, num_rows: int) -> Array:
    """float[num_rows, Dl]: the memory's LLM view (read through a stop-gradient when
    `llm_grad_to_crm` is off, so the LLM losses do not move the memory SASRec reads)."""
    items = self.items(num_rows)
    if not self.cfg.llm_grad_to_crm:
      items = jax.lax.stop_gradient(items)
    return self.to_llm(items)

  def llm_users(self, user_ids: Array) -> Array:
    """int32[B] -> float[B, Dl]."""
    return self.to_llm(jnp.take(self.user_memory, user_ids, axis=0))

  def __call__(self, num_rows: int):
    return self.crm_items(num_rows), self.llm_items(num_rows)


class SoftPrompts(nn.Module):
  """CRM user state float[B, Dc] -> k soft prompt vectors float[B, k, Dl]."""
  cfg: BridgeConfig
  llm_dim: int

  @nn.compact
  def __call__(self, user_state: Array) -> Array:
    k = self.cfg.num_soft_prompts
    flat = _dense(k * self.llm_dim, (None, "embed"), self.cfg.init_std, "prompt",
                  use_bias=True)(user_state)
    return flat.reshape(user_state.shape[0], k, self.llm_dim)


class TitleFusion(nn.Module):
  """Gated fusion of title encodings into CRM item embeddings."""
  cfg: BridgeConfig
  crm_dim: int

  @nn.compact
  def __call__(self, crm_items: Array, title_table: Array) -> Array:
    """crm_items float[N, Dc], title_table float[N, Dl] -> float[N, Dc] (gate * title)."""
    cfg = self.cfg
    t = _dense(self.crm_dim, ("embed", None), cfg.init_std, "title_proj",
               use_bias=True)(title_table)
    g = _dense(self.crm_dim, (None, None), cfg.init_std, "gate", use_bias=True,
               bias_init=cfg.gate_bias_init)(jnp.concatenate([crm_items, t], axis=-1))
    return jax.nn.sigmoid(g) * t


class ItemTokens(nn.Module):
  """Embeds item placeholders of a prompt from the memory's LLM view."""
  cfg: BridgeConfig
  llm_dim: int

  @nn.compact
  def __call__(self, token_embeds: Array, item_ids: Array, llm_items: Array) -> Array:
    """token_embeds float[B, T, Dl], item_ids int32[B, T] (0: keep the token),
    llm_items float[N, Dl] -> float[B, T, Dl]."""
    item_type = self.param("item_type", _kernel(self.cfg.init_std, ("embed",)),
                           (self.llm_dim,))
    items = jnp.take(llm_items, item_ids, axis=0) + item_type
    return jnp.where((item_ids > 0)[..., None], items.astype(token_embeds.dtype),
                     token_embeds)


class LLMHead(nn.Module):
  """Bridged item embeddings (CRM width) -> T5 width."""
  cfg: BridgeConfig
  llm_dim: int

  @nn.compact
  def __call__(self, bridged_items: Array, llm_items: Array) -> Array:
    """float[N, Dc], float[N, Dl] -> float[N, Dl]."""
    return _dense(self.llm_dim, (None, "embed"), self.cfg.init_std,
                  "head_proj")(bridged_items) + llm_items


class Align(nn.Module):
  """One CoReLLa alignment pair: g_llm(h_llm), g_crm(h_crm) in a shared space."""
  cfg: BridgeConfig

  @nn.compact
  def __call__(self, h_llm: Array, h_crm: Array) -> tuple[Array, Array]:
    """float[B, Dl], float[B, Dc] -> float[B, A], float[B, A]."""
    a, std = self.cfg.align_dim, self.cfg.init_std
    return (_dense(a, ("embed", None), std, "g_llm", use_bias=True)(h_llm),
            _dense(a, ("embed", None), std, "g_crm", use_bias=True)(h_crm))


class Bridge(nn.Module):
  """All bridge parts; the joint model calls them one by one (see `JointModel`)."""
  cfg: BridgeConfig
  num_item_rows: int
  crm_dim: int
  llm_dim: int

  def setup(self):
    cfg = self.cfg
    self.memory = Memory(cfg, self.num_item_rows, self.crm_dim, self.llm_dim)
    self.llm_head = LLMHead(cfg, self.llm_dim)
    if cfg.crm_to_llm:
      self.crm_to_llm = SoftPrompts(cfg, self.llm_dim)
    if cfg.item_tokens:
      self.item_tokens = ItemTokens(cfg, self.llm_dim)
    if cfg.llm_to_crm:
      self.llm_to_crm = TitleFusion(cfg, self.crm_dim)
    self.align = [Align(cfg, name=f"align_{j}") for j in range(len(cfg.align_pairs))]

  def __call__(self, *args, **kwargs):
    raise NotImplementedError("call the bridge's parts through JointModel")

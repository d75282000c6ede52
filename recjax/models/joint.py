"""The joint model: CRM (SASRec) + LLM (T5) + bridge, parameters {"crm", "llm", "bridge"}.

Inputs of one forward pass (`JointModel.__call__`), B rows, L history, S CRM targets per row,
T prompt tokens, N = num_items:
  batch["inputs"]        int32[B, L]  left-padded item histories (CRM input)
  batch["llm_input_ids"] int32[B, T]  the prompt's token ids (T5 vocabulary)
  batch["llm_input_mask"] bool[B, T]  real prompt tokens
  batch["llm_item_ids"]  int32[B, T]  item id of an item-token position, else 0
  batch["user_ids"]      int32[B]     only with `bridge.user_memory`
  catalogue["title_ids"] int32[N + 1, Tt], catalogue["title_mask"] bool[N + 1, Tt]
                         item titles (title_mode "step"), or
  catalogue["title_table"] float[N + 1, Dl] precomputed title encodings ("cache").

Freshness of the LLM->CRM title knowledge (`JointConfig.title_mode`):
  "step"  every step encodes all N + 1 titles with the current T5 (inside the one jit), so
          the knowledge is never stale and the CRM loss trains T5 through the titles.
          Cost per step: one T5 encoder forward + backward over (N + 1) * Tt tokens (for
          ML-100K, 1683 titles x ~16 tokens ~ 27k tokens: several prompt batches' worth).
  "cache" the caller passes `title_table = JointTask.encode_titles(params, titles)`,
          refreshed every few hundred steps by the loop; stop-gradient, so T5 gets no
          gradient from the CRM through titles, and the table is up to `refresh` steps old.
          Cost: one encoder forward over the catalogue per refresh.
Without `bridge.llm_to_crm` titles are not needed at all (pass an empty catalogue).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from recjax.models.bridge import Bridge, BridgeConfig
from recjax.models.sasrec import SASRec, SASRecConfig
from recjax.models.t5 import T5, T5Config

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class JointConfig:
  crm: SASRecConfig
  llm: T5Config
  bridge: BridgeConfig = BridgeConfig()
  title_mode: str = "step"   # "step" (fresh, in the jit) or "cache" (input); see module doc
  # Keep T5's token head (`lm_head`, untied T5 v1.1) in the params: needed to generate
  # titles (`JointTask.generate`) and kept by checkpoint import. The item losses never
  # reach it, so a model trained only on them can drop it (no parameters, no Adam state).
  text_head: bool = True

  def __post_init__(self):
    if self.title_mode not in ("step", "cache"):
      raise ValueError(f"title_mode: unknown {self.title_mode!r} (step, cache)")
    for t5_layer, block in self.bridge.align_pairs:
      if not 0 <= t5_layer <= self.llm.num_layers:
        raise ValueError(f"align pair T5 layer {t5_layer} not in 0..{self.llm.num_layers}")
      if not 0 <= block < self.crm.num_blocks:
        raise ValueError(f"align pair SASRec block {block} not in 0..{self.crm.num_blocks - 1}")
    if self.llm.scan_layers:
      raise ValueError("the joint model needs llm.scan_layers=False")

  @property
  def num_rows(self) -> int:
    """Scored catalogue rows: padding + items."""
    return self.crm.num_items + 1


def masked_mean(x: Array, mask: Array) -> Array:
  """float[B, T, D], bool[B, T] -> float[B, D] mean over valid positions (0 if none).

  The sum is an einsum (a batched matmul): its gradient is 3-4x cheaper on XLA:CPU than
  that of `sum(x * mask, axis=1)`.
  """
  m = mask.astype(x.dtype)
  return (jnp.einsum("btd,bt->bd", x, m)
          / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None])


class JointModel(nn.Module):
  """SASRec + T5 + bridge. `__call__` returns every output the joint loss needs."""
  cfg: JointConfig

  def setup(self):
    cfg = self.cfg
    self.crm = SASRec(cfg.crm)
    self.llm = T5(cfg.llm)
    self.bridge = Bridge(cfg.bridge, cfg.crm.vocab, cfg.crm.hidden, cfg.llm.d_model)

  # ---- LLM -> CRM ----------------------------------------------------------------------
  def encode_titles(self, title_ids: Array, title_mask: Array, *,
                    deterministic: bool = True) -> Array:
    """int32[N + 1, Tt], bool[N + 1, Tt] -> float[N + 1, Dl] mean-pooled T5 encodings."""
    out = self.llm.encode(title_ids, title_mask, deterministic=deterministic)
    return masked_mean(out, title_mask)

  def item_tables(self, title_table: Array | None) -> tuple[Array, Array, Array]:
    """Bridged item tables over the catalogue rows 0..N.

    Returns (bridged float[N + 1, Dc]: SASRec item embeddings + extra,
             extra float[N + 1, Dc]: memory + gated titles (row 0 zero), what SASRec's
               `item_extra` adds to its input embeddings,
             memory_llm float[N + 1, Dl]: the memory's T5 view).
    """
    n = self.cfg.num_rows
    crm_table = self.crm.item_table()[:n]
    mem_crm, mem_llm = self.bridge.memory(n)
    extra = mem_crm
    if self.cfg.bridge.llm_to_crm:
      fused = self.bridge.llm_to_crm(crm_table, title_table[:n].astype(crm_table.dtype))
      extra = extra + fused.at[0].set(0.0)
    return crm_table + extra, extra, mem_llm

  def title_table(self, catalogue: dict, deterministic: bool) -> Array | None:
    if not self.cfg.bridge.llm_to_crm:
      return None
    if self.cfg.title_mode == "cache":
      return jax.lax.stop_gradient(catalogue["title_table"])
    return self.encode_titles(catalogue["title_ids"], catalogue["title_mask"],
                              deterministic=deterministic)

  # ---- CRM -----------------------------------------------------------------------------
  def crm_forward(self, inputs: Array, extra: Array, *, deterministic: bool,
                  num_outputs: int | None = None):
    """int32[B, L] -> (float[B, S, Dc] hidden, per-block list of float[B, L, Dc]).

    num_outputs: S, the last positions needed (default L). When the layer alignment
    mean-pools SASRec's last block (`bridge.align_crm_pool="mean"`), that block's outputs
    are needed at every position and S is ignored; otherwise the last block runs at S
    positions only (SASRec's `num_outputs`) and its entry in the list is float[B, S, Dc].
    """
    item_extra = jnp.take(extra, inputs, axis=0)
    last = self.cfg.crm.num_blocks - 1
    full_last = self.cfg.bridge.align_crm_pool == "mean" and any(
        block == last for _, block in self.cfg.bridge.align_pairs)
    x, hidden = self.crm(inputs, deterministic=deterministic, item_extra=item_extra,
                         return_hidden=True, num_outputs=None if full_last else num_outputs)
    return (x if num_outputs is None else x[:, -num_outputs:]), hidden

  def crm_logits(self, hidden: Array, bridged: Array) -> Array:
    """float[..., Dc] -> float32[..., N + 1], scored against the bridged table."""
    return self.crm.score(hidden, item_table=bridged)

  # ---- CRM -> LLM and the LLM head -------------------------------------------------------
  def prompt_embeds(self, batch: dict, user_state: Array, mem_llm: Array
                    ) -> tuple[Array, Array]:
    """The T5 encoder input: K soft prompts, then the prompt with item tokens.

    Returns (float[B, K + T, Dl], bool[B, K + T]); K = 0 without `crm_to_llm`.
    """
    cfg = self.cfg
    mask = batch["llm_input_mask"].astype(bool)
    x = self.llm.shared(batch["llm_input_ids"])
    if cfg.bridge.item_tokens:
      x = self.bridge.item_tokens(x, batch["llm_item_ids"], mem_llm)
    if cfg.bridge.crm_to_llm:
      prompts = self.bridge.crm_to_llm(user_state)
      if cfg.bridge.user_memory:
        prompts = prompts + self.bridge.memory.llm_users(batch["user_ids"])[:, None]
      x = jnp.concatenate([prompts.astype(x.dtype), x], axis=1)
      mask = jnp.concatenate([jnp.ones(prompts.shape[:2], bool), mask], axis=1)
    return x, mask

  def generation_inputs(self, batch: dict, catalogue: dict) -> tuple[Array, Array]:
    """(float[B, K + T, Dl], bool[B, K + T]) encoder inputs for title generation
    (`recjax.decoding.generate(..., inputs_embeds=...)`), deterministic."""
    _, extra, mem_llm = self.item_tables(self.title_table(catalogue, True))
    x, _ = self.crm_forward(batch["inputs"], extra, deterministic=True, num_outputs=1)
    return self.prompt_embeds(batch, x[:, -1], mem_llm)

  def llm_forward(self, batch: dict, user_state: Array, mem_llm: Array, *,
                  deterministic: bool):
    """Encodes the prompt (soft prompts + item tokens), one decoder step.

    Returns (decoder state float[B, Dl], encoder hidden list of L + 1 float[B, K + T, Dl],
             encoder mask bool[B, K + T]).
    """
    cfg = self.cfg
    ids = batch["llm_input_ids"]
    x, mask = self.prompt_embeds(batch, user_state, mem_llm)
    encoded, enc_hidden = self.llm.encoder(x, mask, deterministic=deterministic)
    start = jnp.full((ids.shape[0], 1), cfg.llm.decoder_start_token_id, jnp.int32)
    y, _ = self.llm.decoder(self.llm.shared(start), None, encoded, mask,
                            deterministic=deterministic)
    return y[:, 0], enc_hidden, mask

  def llm_logits(self, state: Array, bridged: Array, mem_llm: Array) -> Array:
    """float[B, Dl] -> float32[B, N + 1]: one matmul against the bridged items in T5 width."""
    table = self.bridge.llm_head(bridged, mem_llm)               # [N + 1, Dl]
    return (state @ table.astype(state.dtype).T).astype(jnp.float32)

  # ---- CoReLLa alignment -----------------------------------------------------------------
  def align(self, enc_hidden, enc_mask, crm_hidden, crm_mask):
    """Per pair j: (g_llm(pool(h_llm[S_j])), g_crm(pool(h_crm[T_j]))), each float[B, A].

    The T5 side is mean-pooled over the encoder's valid positions; the SASRec side too, or
    taken at the last position (`bridge.align_crm_pool="last"`; histories are left-padded,
    so that is the state after the last item).
    """
    out = []
    for j, (t5_layer, block) in enumerate(self.cfg.bridge.align_pairs):
      h_llm = masked_mean(enc_hidden[t5_layer], enc_mask)
      if self.cfg.bridge.align_crm_pool == "last":
        h_crm = crm_hidden[block][:, -1]
      else:
        h_crm = masked_mean(crm_hidden[block], crm_mask)
      out.append(self.bridge.align[j](h_llm, h_crm))
    return out

  def __call__(self, batch: dict, catalogue: dict, *, deterministic: bool = True,
               num_targets: int | None = None) -> dict:
    """Everything the joint loss needs.

    num_targets: S, the CRM positions scored (the last S of the window); default L.
    Returns {"crm_logits": float32[B, S, N + 1], "crm_next": float32[B, N + 1] (last
    position), "llm_logits": float32[B, N + 1], "align": [(float[B, A], float[B, A])]}.
    """
    title_table = self.title_table(catalogue, deterministic)
    bridged, extra, mem_llm = self.item_tables(title_table)
    inputs = batch["inputs"]
    s = inputs.shape[1] if num_targets is None else num_targets
    x, crm_hidden = self.crm_forward(inputs, extra, deterministic=deterministic,
                                     num_outputs=s)
    crm_logits = self.crm_logits(x[:, -s:], bridged)
    user_state, head_items = x[:, -1], bridged
    if not self.cfg.bridge.llm_grad_to_crm:   # the LLM losses leave SASRec alone
      user_state, head_items = jax.lax.stop_gradient((user_state, bridged))
    state, enc_hidden, enc_mask = self.llm_forward(batch, user_state, mem_llm,
                                                   deterministic=deterministic)
    if (self.is_initializing() and self.cfg.text_head
        and not self.cfg.llm.tie_word_embeddings):
      # Create T5's token head too, so the "llm" tree is the full checkpoint tree (text
      # tasks and checkpoint conversion need it); the item head does not use it.
      self.llm.lm_head(state)
    return {
        "crm_logits": crm_logits,
        "crm_next": crm_logits[:, -1],
        "llm_logits": self.llm_logits(state, head_items, mem_llm),
        "align": self.align(enc_hidden, enc_mask, crm_hidden, inputs != 0),
    }

  def crm_scores(self, inputs: Array, catalogue: dict) -> Array:
    """int32[B, L] -> float32[B, N + 1] CRM next-item scores (eval, deterministic)."""
    bridged, extra, _ = self.item_tables(self.title_table(catalogue, True))
    x, _ = self.crm_forward(inputs, extra, deterministic=True, num_outputs=1)
    return self.crm_logits(x[:, -1], bridged)

  def scores(self, batch: dict, catalogue: dict) -> tuple[Array, Array]:
    """(CRM, LLM) next-item scores float32[B, N + 1] each (eval, deterministic)."""
    out = self(batch, catalogue, deterministic=True, num_targets=1)
    return out["crm_next"], out["llm_logits"]

"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018).

A user's item history `int32[B, L]` (LEFT-padded with 0) goes through an item
embedding shared with the output layer, learned positions (by default counted
back from the end of the window, so the most recent item always has the same
position; `position_mode="from_start"` counts from the first real item, as
RecBole does; on ML-100K "from_end" validated better), and
`num_blocks` causal self-attention blocks with point-wise feed-forward layers,
layer norm and dropout. The hidden state at position t summarises items 0..t
and scores every item as the next one: `logits[b, t, i] = h[b, t] . E[i]`.

Two block layouts are offered (`norm_first`):
  * False (post-LN, RecBole's and BERT's): LN(emb) -> x = LN(x + Drop(Attn(x)));
    x = LN(x + Drop(FFN(x))). The reference figures in ANCHORS.md use it.
  * True (pre-LN, the original TensorFlow code's): x = x + Drop(Attn(LN(x)));
    x = x + Drop(FFN(LN(x))); a final LN.
Padding: keys at padded positions are masked out of attention and padded
positions' outputs are zeroed, so real outputs never depend on padding.

`history_bias=True` (off by default; not part of Kang & McAuley's model) adds
one learned scalar to the logit of every item already in the window up to the
scored position: `logits[b, t, i] += w * [i in items[b, :t+1]]`, a one-parameter
repeat/explore switch (RepeatNet's idea, reduced to a bias). The data decide its
sign: on MovieLens nobody rates a film twice, so it learns to push seen items
down, which a dot-product user state cannot do for dozens of items at once.

Layout: the blocks keep activations flattened to float[B*L, D] so every dense
layer is a 2-D matmul; on the CPU, XLA's gradient of a 3-D input matmul (two
contracted axes) is about 4x slower. Only attention reshapes to [B, L, H, Dh].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from recjax.models import layers
from recjax.models.layers import Dropout

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  num_items: int            # real items; ids 1..num_items, 0 = padding
  max_len: int = 50         # history window L
  hidden: int = 64          # D
  num_blocks: int = 2
  num_heads: int = 2
  mlp_dim: int = 256
  dropout: float = 0.5      # on embeddings and after attention / FFN
  attn_dropout: float = 0.5  # on attention probabilities
  mlp_dropout: float = 0.0  # inside the FFN, after the activation (the
                            # original code uses `dropout`; RecBole none)
  activation: str = "gelu"  # "gelu" (RecBole) or "relu" (the paper)
  norm_first: bool = False
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  scale_embeddings: bool = False  # multiply item embeddings by sqrt(D)
  dropout_impl: str = "hash"      # "hash" (fast) or "threefry"; layers.Dropout
  # Learned positions counted "from_start" (the first real item of the window
  # is position 0, as RecBole) or "from_end" (the last slot is max_len - 1,
  # as the original code, where the left padding fixes the positions).
  position_mode: str = "from_end"
  # One learned logit offset for items already in the window (see top).
  history_bias: bool = False
  # Rows of the item table are padded to a multiple of this, so the table can
  # be sharded along the item axis; padded rows are never scored.
  item_table_multiple: int = 1
  dtype: Any = jnp.float32

  @property
  def vocab(self) -> int:
    """Rows of the item table: padding + items, rounded up to the multiple."""
    m = self.item_table_multiple
    return -(-(self.num_items + 1) // m) * m


def _dense(features: int, axes: tuple[str, str], cfg: SASRecConfig, name: str):
  return nn.Dense(
      features, dtype=cfg.dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def _layer_norm(cfg: SASRecConfig, name: str):
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class CausalSelfAttention(nn.Module):
  cfg: SASRecConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               num_queries: int | None = None) -> Array:
    """x: float[B*L, D]; mask: bool[B, 1, L, L] (query, key) -> float[B*Q, D].

    num_queries: Q, attend from the last Q positions only (keys and values still
      cover all L); default L.
    """
    cfg = self.cfg
    batch, length = mask.shape[0], mask.shape[-1]
    nq = length if num_queries is None else num_queries
    head_dim = cfg.hidden // cfg.num_heads
    qkv = nn.DenseGeneral(
        (3, cfg.num_heads, head_dim), dtype=cfg.dtype, name="qkv",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std),
            ("embed", None, "heads", "kv")),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, (None, "heads", "kv")))(x)
    qkv = qkv.reshape(batch, length, 3, cfg.num_heads, head_dim)
    q, k, v = qkv[:, -nq:, 0], qkv[:, :, 1], qkv[:, :, 2]   # [B, Q|L, H, Dh]
    mask = mask[:, :, -nq:]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(
        cfg.dtype)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(cfg.dtype)
    probs = Dropout(cfg.attn_dropout, cfg.dropout_impl)(probs, deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = out.reshape(batch * nq, cfg.num_heads, head_dim)
    return nn.DenseGeneral(
        cfg.hidden, axis=(-2, -1), dtype=cfg.dtype, name="out",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed",)))(out)


class FeedForward(nn.Module):
  cfg: SASRecConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """float[B*L, D] -> float[B*L, D]."""
    cfg = self.cfg
    act = {"gelu": layers.gelu_exact,   # = nn.gelu(approximate=False), cheaper
           "gelu_tanh": lambda y: nn.gelu(y, approximate=True),
           "relu": nn.relu}[cfg.activation]
    h = act(_dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "mlp"))
    h = Dropout(cfg.mlp_dropout, cfg.dropout_impl)(h, deterministic)
    return _dense(cfg.hidden, ("mlp", "embed"), cfg, "wo")(h)


class Block(nn.Module):
  cfg: SASRecConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               num_queries: int | None = None) -> Array:
    """x: float[B*L, D] -> float[B*Q, D], the outputs at the last Q positions
    (num_queries; default all L): the rest of the block then runs on Q rows only."""
    cfg = self.cfg
    drop = lambda y: Dropout(cfg.dropout, cfg.dropout_impl)(y, deterministic)
    attn = CausalSelfAttention(cfg, name="attention")
    ffn = FeedForward(cfg, name="mlp")
    ln_attn = _layer_norm(cfg, "ln_attention")
    ln_mlp = _layer_norm(cfg, "ln_mlp")
    batch, length = mask.shape[0], mask.shape[-1]
    last = lambda y: y if num_queries is None else (
        y.reshape(batch, length, -1)[:, -num_queries:].reshape(-1, y.shape[-1]))
    if cfg.norm_first:
      x = last(x) + drop(attn(ln_attn(x), mask, deterministic, num_queries))
      x = x + drop(ffn(ln_mlp(x), deterministic))
    else:
      x = ln_attn(last(x) + drop(attn(x, mask, deterministic, num_queries)))
      x = ln_mlp(x + drop(ffn(x, deterministic)))
    return nn.with_logical_constraint(x, ("batch", "embed"))


class SASRec(nn.Module):
  """SASRec encoder; `__call__` returns hidden states, `score` item logits."""
  cfg: SASRecConfig

  def setup(self):
    cfg = self.cfg
    self.item_embedding = nn.Embed(
        cfg.vocab, cfg.hidden, dtype=cfg.dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("items", "embed")))
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                     ("length", "embed")),
        (cfg.max_len, cfg.hidden))
    self.blocks = [Block(cfg, name=f"block_{i}") for i in range(cfg.num_blocks)]
    self.ln_embed = _layer_norm(cfg, "ln_embed" if not cfg.norm_first
                                else "ln_final")
    self.dropout = Dropout(cfg.dropout, cfg.dropout_impl)
    if cfg.history_bias:
      self.history_weight = self.param(
          "history_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()),
          ())

  def __call__(self, item_ids: Array, *, deterministic: bool = True,
               item_extra: Array | None = None, return_hidden: bool = False,
               num_outputs: int | None = None):
    """int32[B, L] left-padded histories -> float[B, S, D] hidden states.

    item_extra: optional float[B, L, D] added to the item embeddings (the
      bridge's LLM-to-CRM knowledge plugs in here).
    return_hidden: also return the list of every block's output, float[B, L, D]
      (the last block's float[B, S, D]).
    num_outputs: S, return only the last S positions (default all L). The last
      block then attends from those S positions only (its fused q/k/v
      projection still runs over the window) and runs its output projection,
      feed-forward and norms at S rows: the same values as `self(...)[:, -S:]`
      for less work (training scores the last `stride` positions; evaluation
      only the last one).
    """
    cfg = self.cfg
    length = item_ids.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"history length {length} > max_len {cfg.max_len}")
    valid = item_ids != 0                                        # [B, L]
    x = self.item_embedding(item_ids)
    if cfg.scale_embeddings:
      x = x * jnp.sqrt(cfg.hidden).astype(x.dtype)
    if item_extra is not None:
      x = x + item_extra.astype(x.dtype)
    x = x + self._positions(valid).astype(x.dtype)
    if not cfg.norm_first:
      x = self.ln_embed(x)
    x = self.dropout(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    batch = item_ids.shape[0]
    keep = valid.reshape(batch * length, 1)
    x = x.reshape(batch * length, cfg.hidden) * keep              # [B*L, D]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = (causal[None] & valid[:, None, :])[:, None]          # [B, 1, L, L]
    unflat = lambda y: y.reshape(batch, length, cfg.hidden)
    out_len = length if num_outputs is None else num_outputs
    if not 1 <= out_len <= length:
      raise ValueError(f"num_outputs {num_outputs} not in 1..{length}")
    hidden = []
    for i, block in enumerate(self.blocks):
      if i == len(self.blocks) - 1 and out_len < length:
        x = block(x, mask, deterministic, num_queries=out_len)
        keep = valid[:, -out_len:].reshape(batch * out_len, 1)
        unflat = lambda y: y.reshape(batch, out_len, cfg.hidden)
      else:
        x = block(x, mask, deterministic)
      x = x * keep
      hidden.append(unflat(x))
    if cfg.norm_first:
      x = self.ln_embed(x) * keep
    x = unflat(x)[:, -out_len:]                # a no-op unless there are no blocks
    return (x, hidden) if return_hidden else x

  def _positions(self, valid: Array) -> Array:
    """bool[B, L] (left-padded) -> float[B, L, D] position embeddings."""
    cfg, length = self.cfg, valid.shape[1]
    if cfg.position_mode == "from_end":
      return self.position_embedding[None, cfg.max_len - length:]
    if cfg.position_mode == "from_start":
      index = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)     # [B, L]
      return jnp.take(self.position_embedding, index, axis=0)
    raise ValueError(f"position_mode: unknown {cfg.position_mode!r} "
                     "(from_start, from_end)")

  def item_table(self) -> Array:
    """float[N + 1, D]: the (shared) item embeddings used for scoring."""
    return self.item_embedding.embedding

  def score(self, hidden: Array, item_table: Array | None = None,
            history_ids: Array | None = None) -> Array:
    """float[..., D] -> float32[..., N + 1] logits over the whole catalogue.

    history_ids: int32[B, L], the window `hidden` float[B, S, D] was computed
      from (its last S positions); required with `history_bias`, ignored without.
    """
    table = self.item_table() if item_table is None else item_table
    table = table[:self.cfg.num_items + 1]
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])       # 2-D matmul (see top)
    logits = flat @ table.astype(hidden.dtype).T
    logits = logits.reshape(*lead, table.shape[0]).astype(jnp.float32)
    if self.cfg.history_bias:
      if history_ids is None or hidden.ndim != 3:
        raise ValueError("history_bias: score() needs hidden float[B, S, D] and "
                         "the window history_ids int32[B, L] it came from")
      logits = logits + self.history_weight * seen_items(
          history_ids, hidden.shape[1], table.shape[0])
    return logits

  def last_hidden(self, item_ids: Array) -> Array:
    """int32[B, L] -> float[B, D]: the user state after the last item."""
    return self(item_ids, deterministic=True, num_outputs=1)[:, -1]

  def scores(self, item_ids: Array) -> Array:
    """int32[B, L] histories -> float32[B, N + 1] next-item scores (eval)."""
    hidden = self.last_hidden(item_ids)[:, None]
    return self.score(hidden, history_ids=item_ids)[:, 0]


def seen_items(item_ids: Array, num_outputs: int, num_rows: int) -> Array:
  """int32[B, L] window -> float32[B, S, num_rows]: 1 where item i occurs at or
  before the s-th of the last S = num_outputs positions (padding 0 never counts).

  Each row scatters its items' first positions into int32[num_rows] (vmapped,
  so a batch-sharded input stays local to its devices), then one comparison
  against the S output positions gives the mask.
  """
  length = item_ids.shape[1]
  positions = length - num_outputs + jnp.arange(num_outputs)       # [S]

  def first_position(ids):                                         # [L] -> [V]
    where = jnp.where(ids != 0, jnp.arange(length), length)
    return jnp.full((num_rows,), length, jnp.int32).at[ids].min(where, mode="drop")

  first = jax.vmap(first_position)(item_ids)                       # [B, V]
  return (first[:, None, :] <= positions[None, :, None]).astype(jnp.float32)

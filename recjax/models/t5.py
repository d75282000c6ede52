"""T5 / FLAN-T5 encoder-decoder in Flax linen, numerically equal to Hugging Face's PyTorch T5.

Two families share the code, selected by `T5Config`:
  * T5 v1.1 / FLAN-T5: gated-GELU feed-forward (tanh GELU), untied input and output
    embeddings, no output scaling (`feed_forward_proj="gated-gelu"`,
    `tie_word_embeddings=False`).
  * original T5: ReLU feed-forward, output projection tied to the input embedding and the
    decoder output scaled by `d_model**-0.5` (`feed_forward_proj="relu"`,
    `tie_word_embeddings=True`).
Both: RMS layer norm, no biases, unscaled attention logits, bucketed relative position bias
(bidirectional in the encoder, causal in the decoder) computed by the first block of each
stack and shared by all its blocks.

Parameter tree (paths mirror the HF checkpoint, see `recjax.convert.t5_hf`):
  shared/embedding                                   float[V, D]   (vocab, embed)
  encoder/block_{i}/layer_0/SelfAttention/{q,k,v}/kernel   [D, H, Dk] (embed, heads, kv)
  encoder/block_{i}/layer_0/SelfAttention/o/kernel         [H, Dk, D] (heads, kv, embed)
  encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding  [buckets, H]
  encoder/block_{i}/layer_{0,1}/layer_norm/scale           [D]        (embed,)
  encoder/block_{i}/layer_1/DenseReluDense/{wi_0,wi_1|wi}/kernel  [D, F] (embed, mlp)
  encoder/block_{i}/layer_1/DenseReluDense/wo/kernel       [F, D]     (mlp, embed)
  encoder/final_layer_norm/scale
  decoder/...: as the encoder, plus layer_1/EncDecAttention, with the FF in layer_2
  lm_head/kernel                                     float[D, V]   (untied models only)
With `scan_layers=True`, blocks 1..L-1 of each stack are stacked under `block_scan` with a
leading `layers` axis (block_0 stays apart: it owns the relative position table); see
`scan_params` / `unscan_params`.

KV-cache contract for incremental decoding (used by `recjax.decoding`):
  * `cache = init_cache(module, batch_size, max_decode_len, encoder_len)` builds the zero
    cache directly (no params, no tracing):
      cache["decoder"]["block_{i}"]["layer_0"]["SelfAttention"] =
          {"cached_key": [B, max_decode_len, H, Dk], "cached_value": same,
           "cache_index": int32[]}
      cache["decoder"]["block_{i}"]["layer_1"]["EncDecAttention"] =
          {"cached_key": [B, encoder_len, H, Dk], "cached_value": same}
  * one step:
      logits, mutated = module.apply({"params": params, "cache": cache}, encoded,
                                     encoder_mask, token_ids, decode=True,
                                     method=T5.decode, mutable=["cache"])
    with token_ids int32[B, T] (T=1 for a step; T>1 prefills T positions at once),
    logits float32[B, T, V] and `mutated["cache"]` the next cache. Queries sit at positions
    `cache_index + arange(T)`; they attend causally to cache slots `<= position`, and the
    relative position bias uses those positions; keep `cache_index + T <= max_decode_len`.
    `decoder_attention_mask` is ignored.
  * the encoder keys/values are projected from `encoded` on the step where
    `cache_index == 0` and reused afterwards: pass the same `encoded` (reordered like the
    cache) on every step.
  * every leaf with ndim >= 1 has the batch as its leading axis (beam search may reorder or
    expand it with `x[indices]`); scalar leaves are the `cache_index` step counters.
  * incremental decoding needs `scan_layers=False` (use `unscan_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recjax.models import t5_layers as layers
from recjax.models.layers import Dropout
from recjax.models.t5_layers import Block, Dense, Embed, RMSNorm, constrain

Array = jax.Array

# Hugging Face configurations (config.json of google/flan-t5-* and google-t5/t5-*).
PRESETS: dict[str, dict[str, Any]] = {
    "flan-t5-small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "flan-t5-base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "flan-t5-large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "flan-t5-xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "flan-t5-xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
    "t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8,
                     feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12,
                    feed_forward_proj="relu", tie_word_embeddings=True),
}

# remat_policy -> jax.checkpoint policy (None: save nothing, recompute the whole block).
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model; field names follow HF `T5Config`. Defaults: flan-t5-small."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  # Defaults to num_layers.
  num_decoder_layers: int | None = None
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  # Dropout masks: "hash" (counter hash, cheap on CPU) or "threefry" (jax.random);
  # see recjax.models.layers.Dropout.
  dropout_impl: str = "hash"
  layer_norm_epsilon: float = 1e-6
  # "gated-gelu" (T5 v1.1, FLAN-T5), "relu" (original T5); also "gelu", "silu", "gated-*".
  feed_forward_proj: str = "gated-gelu"
  # True: output projection = input embedding (original T5); False: separate lm_head.
  tie_word_embeddings: bool = False
  # Multiply the decoder output by d_model**-0.5 before the output projection; None means
  # "same as tie_word_embeddings" (the HF rule).
  scale_decoder_outputs: bool | None = None
  # Activation and parameter dtypes.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decoder_start_token_id: int = 0
  pad_token_id: int = 0
  eos_token_id: int = 1
  # Scan blocks 1..L-1 of each stack (faster compiles of deep models).
  scan_layers: bool = False
  # "none", or rematerialise each block: "full", "dots", "dots_no_batch".
  remat_policy: str = "none"
  # Attention kernel: "einsum" (two einsums and a float32 softmax; any backend, attention
  # dropout), or `jax.nn.dot_product_attention` with implementation "xla" or "cudnn"
  # (fused flash attention on NVIDIA GPUs, bf16/fp16 activations). The fused kernels have
  # no dropout on the attention weights: training with them needs dropout_rate=0.
  attention_impl: str = "einsum"

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    layers.activation_name(self.feed_forward_proj)  # validates
    if self.dropout_impl not in ("hash", "threefry"):
      raise ValueError(f"dropout_impl {self.dropout_impl!r} not in ('hash', 'threefry')")
    if self.remat_policy != "none" and self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {['none', *_REMAT_POLICIES]}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
    if self.attention_impl == "cudnn" and self.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 activations, "
                       f"got dtype {self.dtype}")

  @classmethod
  def preset(cls, name: str, **overrides) -> T5Config:
    """`T5Config.preset("flan-t5-base", dropout_rate=0.0)`."""
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})

  def replace(self, **changes) -> T5Config:
    return dataclasses.replace(self, **changes)


def _block_class(cfg: T5Config):
  if cfg.remat_policy == "none":
    return Block
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


def _as_bool(mask: Array | None) -> Array | None:
  return None if mask is None else jnp.asarray(mask).astype(bool)


class T5Stack(nn.Module):
  """Encoder (`is_decoder=False`) or decoder stack over already embedded tokens."""
  config: T5Config
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, encoded: Array | None = None,
               encoder_mask: Array | None = None, *, deterministic: bool = True,
               decode: bool = False) -> tuple[Array, list[Array]]:
    """Runs the blocks and the final layer norm.

    Args:
      x: float[B, T, D] token embeddings.
      mask: bool[B, T] valid tokens (keys), or None for all; ignored when `decode`.
      encoded: float[B, S, D] encoder output (decoder only).
      encoder_mask: bool[B, S] or None.
    Returns:
      float[B, T, D] normed output and the L + 1 hidden states (the embeddings after
      dropout, then each block's output before the final norm), each float[B, T, D].
    """
    cfg = self.config
    n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    block_cls = _block_class(cfg)
    kw = dict(is_decoder=self.is_decoder, deterministic=deterministic, decode=decode)
    first = block_cls(cfg, has_relative_bias=True, name="block_0", **kw)
    neg = layers.mask_value(cfg.dtype)

    x = Dropout(cfg.dropout_rate, cfg.dropout_impl)(x, deterministic)
    x = constrain(x, ("batch", "length", "embed"))
    t = x.shape[1]
    first_step = None
    if decode:
      position_bias, keep, index = first.decode_position_bias(t)
      first_step = index == 0
    else:
      position_bias = first.position_bias(t, t)
      keep = jnp.tril(jnp.ones((t, t), bool))[None, None] if self.is_decoder else None
      if mask is not None:
        mask = mask[:, None, None, :]
        keep = mask if keep is None else keep & mask
    bias = position_bias if keep is None else layers.masked_bias(position_bias, keep)

    cross_bias = None
    if self.is_decoder:
      if encoder_mask is None:
        cross_bias = jnp.zeros((1, 1, 1, encoded.shape[1]), cfg.dtype)
      else:
        cross_bias = jnp.where(encoder_mask[:, None, None, :], jnp.zeros((), cfg.dtype), neg)

    args = (bias, encoded, cross_bias, first_step)
    hidden = [x]
    x, _ = first(x, *args)
    hidden.append(x)
    if n > 1 and cfg.scan_layers:
      if decode:
        raise NotImplementedError("decode=True needs scan_layers=False (see unscan_params)")
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=n - 1,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, ys = scanned(cfg, name="block_scan", **kw)(x, *args)
      hidden += [ys[i] for i in range(n - 1)]
    else:
      for i in range(1, n):
        x, _ = block_cls(cfg, name=f"block_{i}", **kw)(x, *args)
        hidden.append(x)
    y = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="final_layer_norm")(x)
    y = Dropout(cfg.dropout_rate, cfg.dropout_impl)(y, deterministic)
    return y, hidden


class T5(nn.Module):
  """T5 encoder-decoder with a language-model head.

  `apply({"params": p}, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)`
  returns float32 logits [B, T, V]; `encode` and `decode` are available through
  `method=T5.encode` / `method=T5.decode`. Dropout (when `deterministic=False`) uses the
  "dropout" rng. Masks are 1/True for real tokens and 0/False for padding.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.shared = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), std=1.0, **kw)
    self.encoder = T5Stack(cfg, is_decoder=False)
    self.decoder = T5Stack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense((cfg.vocab_size,), ("embed", "vocab"), std=1.0, **kw)

  def encode(self, input_ids: Array, attention_mask: Array | None = None, *,
             prefix_embeds: Array | None = None, deterministic: bool = True,
             return_hidden: bool = False):
    """Encodes the source.

    Args:
      input_ids: int32[B, S].
      attention_mask: int/bool[B, S] or None (all tokens valid).
      prefix_embeds: float[B, K, D] soft-prompt vectors put before the embedded tokens
        (always attended); the output then has K + S positions, and the decoder's
        `encoder_mask` must be `prefix_mask(attention_mask, K)`.
      return_hidden: also return the S-position hidden states of every layer.
    Returns:
      float[B, K + S, D], or (that, list of L + 1 float[B, K + S, D]) with `return_hidden`.
    """
    x = self.shared(input_ids)
    if prefix_embeds is not None:
      x = jnp.concatenate([prefix_embeds.astype(x.dtype), x], axis=1)
      if attention_mask is not None:
        attention_mask = prefix_mask(attention_mask, prefix_embeds.shape[1])
    y, hidden = self.encoder(x, _as_bool(attention_mask), deterministic=deterministic)
    return (y, hidden) if return_hidden else y

  def encode_embeds(self, inputs_embeds: Array, attention_mask: Array | None = None, *,
                    deterministic: bool = True) -> Array:
    """float[B, S, D] input embeddings (e.g. soft prompts + item tokens + text) ->
    float[B, S, D] encodings; for inputs that are not all vocabulary tokens."""
    y, _ = self.encoder(inputs_embeds.astype(self.config.dtype), _as_bool(attention_mask),
                        deterministic=deterministic)
    return y

  def decode(self, encoded: Array, encoder_mask: Array | None, decoder_input_ids: Array,
             decoder_attention_mask: Array | None = None, *, deterministic: bool = True,
             decode: bool = False, return_hidden: bool = False):
    """Decodes (teacher forcing, or one cached step with `decode=True`; see module doc).

    Args:
      encoded: float[B, S, D] output of `encode`.
      encoder_mask: int/bool[B, S] or None.
      decoder_input_ids: int32[B, T] (targets shifted right, starting with
        `decoder_start_token_id`; see `shift_right`).
      decoder_attention_mask: int/bool[B, T] or None (causal mask only).
    Returns:
      float32 logits [B, T, V], or (logits, list of L + 1 float[B, T, D]) with
      `return_hidden`.
    """
    cfg = self.config
    y = self.shared(decoder_input_ids)
    y, hidden = self.decoder(y, _as_bool(decoder_attention_mask), encoded,
                             _as_bool(encoder_mask), deterministic=deterministic,
                             decode=decode)
    if cfg.scale_decoder_outputs:
      y = y * jnp.asarray(cfg.d_model ** -0.5, y.dtype)
    logits = self.shared.attend(y) if cfg.tie_word_embeddings else self.lm_head(y)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return (logits, hidden) if return_hidden else logits

  def __call__(self, input_ids: Array, decoder_input_ids: Array,
               attention_mask: Array | None = None, decoder_attention_mask: Array | None = None,
               *, prefix_embeds: Array | None = None, deterministic: bool = True,
               return_hidden: bool = False):
    """int32[B, S], int32[B, T] -> float32 logits [B, T, V].

    With `return_hidden`: (logits, {"encoder": [L+1 x float[B, S, D]],
    "decoder": [L+1 x float[B, T, D]]}).
    """
    encoded = self.encode(input_ids, attention_mask, prefix_embeds=prefix_embeds,
                          deterministic=deterministic, return_hidden=return_hidden)
    if return_hidden:
      encoded, enc_hidden = encoded
    if prefix_embeds is not None and attention_mask is not None:
      attention_mask = prefix_mask(attention_mask, prefix_embeds.shape[1])
    out = self.decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                      deterministic=deterministic, return_hidden=return_hidden)
    if return_hidden:
      logits, dec_hidden = out
      return logits, {"encoder": enc_hidden, "decoder": dec_hidden}
    return out


def prefix_mask(attention_mask: Array, num_prefix: int) -> Array:
  """int/bool[B, S] -> same dtype [B, K + S] with the K soft-prompt positions valid."""
  mask = jnp.asarray(attention_mask)
  ones = jnp.ones((mask.shape[0], num_prefix), mask.dtype)
  return jnp.concatenate([ones, mask], axis=1)


def shift_right(labels: Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Array:
  """Decoder inputs from targets, as HF: int[B, T] -> int[B, T] (start token, then
  labels[:, :-1]; ignored labels -100 become `pad_token_id`)."""
  labels = jnp.asarray(labels)
  shifted = jnp.concatenate(
      [jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


def init_cache(module: T5 | T5Config, batch_size: int, max_decode_len: int,
               encoder_len: int) -> dict[str, Any]:
  """Zero decoding cache (see the module docstring for the contract); no params needed."""
  cfg = module if isinstance(module, T5Config) else module.config
  if cfg.scan_layers:
    raise NotImplementedError("incremental decoding needs scan_layers=False")

  def kv(length):
    return jnp.zeros((batch_size, length, cfg.num_heads, cfg.d_kv), cfg.dtype)

  blocks = {}
  for i in range(cfg.num_decoder_layers):
    blocks[f"block_{i}"] = {
        "layer_0": {"SelfAttention": {"cached_key": kv(max_decode_len),
                                      "cached_value": kv(max_decode_len),
                                      "cache_index": jnp.zeros((), jnp.int32)}},
        "layer_1": {"EncDecAttention": {"cached_key": kv(encoder_len),
                                        "cached_value": kv(encoder_len)}},
    }
  return {"decoder": blocks}


def _stack(xs):
  xp = np if all(isinstance(x, np.ndarray) for x in xs) else jnp
  return xp.stack(xs)


def scan_params(params: dict[str, Any], config: T5Config) -> dict[str, Any]:
  """Unscanned tree (`block_0..block_{L-1}`) -> scanned tree (`block_0`, `block_scan`)."""
  params = dict(params)
  for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    tree = dict(params[stack])
    blocks = [tree.pop(f"block_{i}") for i in range(1, n)]
    if blocks:
      tree["block_scan"] = jax.tree.map(lambda *xs: _stack(xs), *blocks)
    params[stack] = tree
  return params


def unscan_params(params: dict[str, Any], config: T5Config) -> dict[str, Any]:
  """Inverse of `scan_params`."""
  params = dict(params)
  for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    tree = dict(params[stack])
    stacked = tree.pop("block_scan", None)
    for i in range(1, n):
      tree[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i - 1], stacked)
    params[stack] = tree
  return params


def train_flops(config: T5Config, batch: int, source_len: int, target_len: int) -> int:
  """Model flops of one training step (forward + backward = 3 x the forward's matmuls).

  Counts every matmul of the forward pass at 2 flops per multiply-add: the projections,
  feed-forwards and output head at the tokens they run on, the cross-attention keys and
  values at the encoder tokens, and the attention logits and weighted values (full
  `[Q, K]` squares, padding and causal masks not subtracted). Elementwise work, the
  embedding lookup and the optimizer are not counted: the usual definition for MFU.
  """
  cfg = config
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  ff = (3 if layers.activation_name(cfg.feed_forward_proj)[1] else 2) * d * cfg.d_ff
  enc_tokens, dec_tokens = batch * source_len, batch * target_len
  attn = lambda q, k: 2 * 2 * batch * q * k * inner          # logits + weighted values
  enc = cfg.num_layers * (enc_tokens * 2 * (4 * d * inner + ff) + attn(source_len, source_len))
  dec = cfg.num_decoder_layers * (
      dec_tokens * 2 * (6 * d * inner + ff)                     # self q,k,v,o; cross q,o
      + enc_tokens * 2 * (2 * d * inner)                        # cross k, v
      + attn(target_len, target_len) + attn(target_len, source_len))
  head = dec_tokens * 2 * d * cfg.vocab_size
  return 3 * (enc + dec + head)


def count_params(params: Any) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))

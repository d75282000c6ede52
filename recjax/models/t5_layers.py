"""Building blocks of the T5 encoder-decoder (Flax linen).

Submodule names copy the Hugging Face checkpoint (`block_0/layer_0/SelfAttention/q/kernel`
for `block.0.layer.0.SelfAttention.q.weight`), so `recjax.convert.t5_hf` is a rename plus
a transpose/reshape. Every parameter carries logical axis names (`vocab`, `embed`, `mlp`,
`heads`, `kv`) and the main activations are constrained with (`batch`, `length`, ...);
without a mesh and axis rules these constraints are no-ops.

Shapes: B batch, Q query length, K key length, D d_model, H heads, Dk d_kv, F d_ff,
V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recjax.models import layers
from recjax.models.layers import Dropout

Array = jax.Array
Config = Any  # recjax.models.t5.T5Config (not imported: it imports this module).

# Activation of the feed-forward block, by the last part of `feed_forward_proj`. HF maps
# "gated-gelu" to the tanh approximation ("gelu_new") and plain "gelu" to the exact one.
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": layers.gelu_exact,          # = jax.nn.gelu(approximate=False), cheaper
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation_name(feed_forward_proj: str) -> tuple[str, bool]:
  """`"gated-gelu"` -> `("gelu_new", True)`, `"relu"` -> `("relu", False)`."""
  parts = feed_forward_proj.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {feed_forward_proj!r}")
  name = parts[-1]
  if feed_forward_proj == "gated-gelu":
    name = "gelu_new"
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}")
  return name, gated


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Logical sharding constraint; a no-op without a mesh and axis rules."""
  return nn.with_logical_constraint(x, axes)


def mask_value(dtype) -> Array:
  """The attention logit of a masked-out key (as HF: the dtype's minimum)."""
  return jnp.asarray(jnp.finfo(dtype).min, dtype)


@jax.custom_vjp
def masked_bias(position_bias: Array, keep: Array) -> Array:
  """`where(keep, position_bias, mask_value)`: the attention bias of a batch.

  position_bias float[1, H, Q, K] (shared by the batch), keep bool[B, 1, Q|1, K] ->
  float[B, H, Q, K]. Same values as the `jnp.where`; only the gradient differs in how it
  is computed: the sum over the batch of the bias's cotangent is a `[1, B] @ [B, H*Q*K]`
  matmul, because XLA:CPU's reduction over the leading axis of a 4-D tensor is 10-50x
  slower (3.2 ms vs 0.14 ms at [32, 4, 68, 68], 8.4 vs 0.24 ms at [8, 6, 128, 128]).
  """
  return jnp.where(keep, position_bias, mask_value(position_bias.dtype))


def _masked_bias_fwd(position_bias, keep):
  return masked_bias(position_bias, keep), (keep, position_bias)


def _masked_bias_bwd(res, g):
  keep, position_bias = res
  shape = position_bias.shape
  g = jnp.where(keep, g, jnp.zeros((), g.dtype))                 # [B, H, Q, K]
  if shape[0] == 1 and g.shape[0] > 1:
    ones = jnp.ones((1, g.shape[0]), g.dtype)
    g = jnp.matmul(ones, g.reshape(g.shape[0], -1),
                   preferred_element_type=jnp.float32).reshape(1, *g.shape[1:])
  axes = tuple(i for i, (n, m) in enumerate(zip(shape, g.shape)) if n == 1 and m > 1)
  g = jnp.sum(g, axis=axes, keepdims=True) if axes else g
  return g.astype(position_bias.dtype), None


masked_bias.defvjp(_masked_bias_fwd, _masked_bias_bwd)


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """Mesh-TensorFlow / HF bucketing of `memory_position - query_position` (numpy, static).

  Half of the buckets hold exact distances, the other half log-spaced distances up to
  `max_distance`; with `bidirectional` the buckets are split between both directions,
  otherwise positive (future) distances share bucket 0. Computed in float32 like PyTorch.

  Args:
    relative_position: int[...] key position minus query position.
  Returns:
    int32[...] bucket ids in [0, num_buckets).
  """
  rel = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
  large = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (large * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class Dense(nn.Module):
  """Bias-free projection contracting the last `n_in` input axes with the kernel's leading ones.

  The kernel has shape `x.shape[-n_in:] + features`, e.g. `[D, H, Dk]` for a query projection
  (HF's `[H*Dk, D]` weight transposed and reshaped).
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  std: float
  n_in: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.n_in:]
    init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
    kernel = self.param("kernel", init, tuple(in_shape) + tuple(self.features), self.param_dtype)
    return layers.dense_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)




class Embed(nn.Module):
  """Lookup table `embedding: [num_embeddings, features]`; also the tied output projection."""
  num_embeddings: int
  features: int
  axes: tuple[str | None, ...]
  std: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
    self.embedding = self.param("embedding", init, (self.num_embeddings, self.features),
                                self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """int[...] -> float[..., features]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """float[..., features] -> float[..., num_embeddings] (x @ embedding.T)."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head attention without logit scaling; self-attention or encoder-decoder attention.

  With `has_relative_bias` (the first self-attention layer of each stack) it owns the
  relative position table `relative_attention_bias/embedding: [num_buckets, H]` and
  `position_bias` computes the bias that every layer of the stack then shares.
  """
  config: Config
  has_relative_bias: bool = False
  bidirectional: bool = True

  def setup(self):
    cfg = self.config
    h, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.q = Dense((h, dk), ("embed", "heads", "kv"), std=(d * dk) ** -0.5, **kw)
    self.k = Dense((h, dk), ("embed", "heads", "kv"), std=d ** -0.5, **kw)
    self.v = Dense((h, dk), ("embed", "heads", "kv"), std=d ** -0.5, **kw)
    self.o = Dense((d,), ("heads", "kv", "embed"), std=(h * dk) ** -0.5, n_in=2, **kw)
    if self.has_relative_bias:
      self.relative_attention_bias = Embed(
          cfg.relative_attention_num_buckets, h, (None, "heads"), std=d ** -0.5, **kw)
    self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_impl)

  def _buckets(self, relative_position):
    return relative_position_bucket(
        relative_position, bidirectional=self.bidirectional,
        num_buckets=self.config.relative_attention_num_buckets,
        max_distance=self.config.relative_attention_max_distance)

  def position_bias(self, q_len: int, k_len: int) -> Array:
    """Static positions (training, scoring). -> float[1, H, Q, K]."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    values = self.relative_attention_bias(jnp.asarray(self._buckets(rel)))  # [Q, K, H]
    return jnp.transpose(values, (2, 0, 1))[None]

  def decode_position_bias(self, q_len: int) -> tuple[Array, Array, Array]:
    """Positions of an incremental decoding step, read from this layer's cache.

    Returns:
      bias float[1, H, Q, K] for queries at `cache_index + arange(Q)` against every cache
      slot `arange(K)` (K = max_decode_len), the causal mask bool[1, 1, Q, K] and the
      int32 scalar `cache_index` before this step.
    """
    if self.has_variable("cache", "cached_key"):
      k_len = self.get_variable("cache", "cached_key").shape[1]
      index = self.get_variable("cache", "cache_index")
    else:  # `init(..., decode=True)`: the cache is created with the input's length.
      k_len, index = q_len, jnp.zeros((), jnp.int32)
    table = jnp.asarray(self._buckets(np.arange(-(k_len - 1), k_len)))  # [2K - 1]
    q_pos = index + jnp.arange(q_len)
    rel = jnp.arange(k_len)[None, :] - q_pos[:, None]
    values = self.relative_attention_bias(jnp.take(table, rel + k_len - 1))  # [Q, K, H]
    mask = (jnp.arange(k_len)[None, :] <= q_pos[:, None])[None, None]
    return jnp.transpose(values, (2, 0, 1))[None], mask, index

  def _self_cache(self, k: Array, v: Array) -> tuple[Array, Array]:
    """Writes this step's keys/values at `cache_index` and returns the whole cache."""
    b, t, h, dk = k.shape
    initializing = not self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, (b, t, h, dk), k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, (b, t, h, dk), v.dtype)
    ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if initializing:
      return k, v
    index = ci.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, index, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, index, 0, 0))
    ci.value = index + t
    return ck.value, cv.value

  def _cross_cache(self, kv: Array, first_step: Array) -> tuple[Array, Array]:
    """Encoder keys/values projected on the first decoding step and reused afterwards."""
    b, s = kv.shape[:2]
    shape = (b, s, self.config.num_heads, self.config.d_kv)
    initializing = not self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, shape, self.config.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, shape, self.config.dtype)
    if initializing:
      return self.k(kv), self.v(kv)
    k, v = nn.cond(first_step,
                   lambda mdl, x: (mdl.k(x), mdl.v(x)),
                   lambda mdl, x: (mdl.get_variable("cache", "cached_key"),
                                   mdl.get_variable("cache", "cached_value")), self, kv)
    ck.value, cv.value = k, v
    return k, v

  @nn.compact  # the cache variables are created here; the projections in setup
  def __call__(self, x: Array, kv: Array | None, bias: Array, *, deterministic: bool,
               decode: bool = False, first_step: Array | None = None) -> Array:
    """Attention of `x` over `kv` (`None` for self-attention).

    Args:
      x: float[B, Q, D] (already layer-normed).
      kv: float[B, K, D] encoder output for cross-attention, None for self-attention.
      bias: float[B|1, H, Q, K] additive position bias with masked entries at the dtype min.
      decode: use the "cache" collection (self-attention: append at `cache_index`;
        cross-attention: project the encoder output once, when `first_step` is true).
    Returns:
      float[B, Q, D].
    """
    cross = kv is not None
    kv = kv if cross else x
    q = constrain(self.q(x), ("batch", "length", "heads", "kv"))
    if decode and cross:
      k, v = self._cross_cache(kv, first_step)
    else:
      k, v = self.k(kv), self.v(kv)
      if decode:
        k, v = self._self_cache(k, v)
    k = constrain(k, ("batch", "length", "heads", "kv"))
    v = constrain(v, ("batch", "length", "heads", "kv"))
    impl = self.config.attention_impl
    if impl == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias.astype(q.dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      weights = self.dropout(weights, deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      if not deterministic and self.config.dropout_rate > 0:
        raise ValueError(f"attention_impl={impl!r} has no attention-weight dropout: train "
                         "with dropout_rate=0 or use attention_impl='einsum'")
      # cuDNN wants the bias's query and key axes at full length (batch, heads broadcast),
      # and masked logits at a large finite negative rather than the dtype's minimum (as
      # jax's own cuDNN masks, which work around a cuDNN bug with two such values).
      bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1]))
      if impl == "cudnn":
        bias = jnp.maximum(bias, jnp.asarray(-2.0 ** 41, bias.dtype))
      out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0,
                                         implementation=impl)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    return self.o(out)


class FeedForward(nn.Module):
  """`wo(act(wi(x)))` or the gated `wo(act(wi_0(x)) * wi_1(x))`; float[B, L, D] -> same."""
  config: Config

  def setup(self):
    cfg = self.config
    self.act, self.gated = activation_name(cfg.feed_forward_proj)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    wi = lambda: Dense((cfg.d_ff,), ("embed", "mlp"), std=cfg.d_model ** -0.5, **kw)
    if self.gated:
      self.wi_0, self.wi_1 = wi(), wi()
    else:
      self.wi = wi()
    self.wo = Dense((cfg.d_model,), ("mlp", "embed"), std=cfg.d_ff ** -0.5, **kw)
    self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_impl)

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    act = _ACTIVATIONS[self.act]
    h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
    h = constrain(h, ("batch", "length", "mlp"))
    return self.wo(self.dropout(h, deterministic))


class SelfAttentionLayer(nn.Module):
  """`x + dropout(SelfAttention(layer_norm(x)))` (HF `T5LayerSelfAttention`)."""
  config: Config
  has_relative_bias: bool = False
  bidirectional: bool = True

  def setup(self):
    cfg = self.config
    self.layer_norm = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype)
    self.SelfAttention = Attention(cfg, self.has_relative_bias, self.bidirectional)
    self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_impl)

  def __call__(self, x, bias, *, deterministic, decode=False):
    y = self.SelfAttention(self.layer_norm(x), None, bias, deterministic=deterministic,
                           decode=decode)
    return x + self.dropout(y, deterministic)


class CrossAttentionLayer(nn.Module):
  """`x + dropout(EncDecAttention(layer_norm(x), encoded))` (HF `T5LayerCrossAttention`)."""
  config: Config

  def setup(self):
    cfg = self.config
    self.layer_norm = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype)
    self.EncDecAttention = Attention(cfg)
    self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_impl)

  def __call__(self, x, encoded, bias, *, deterministic, decode=False, first_step=None):
    y = self.EncDecAttention(self.layer_norm(x), encoded, bias, deterministic=deterministic,
                             decode=decode, first_step=first_step)
    return x + self.dropout(y, deterministic)


class FeedForwardLayer(nn.Module):
  """`x + dropout(DenseReluDense(layer_norm(x)))` (HF `T5LayerFF`)."""
  config: Config

  def setup(self):
    cfg = self.config
    self.layer_norm = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype)
    self.DenseReluDense = FeedForward(cfg)
    self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_impl)

  def __call__(self, x, *, deterministic):
    y = self.DenseReluDense(self.layer_norm(x), deterministic=deterministic)
    return x + self.dropout(y, deterministic)


class Block(nn.Module):
  """One encoder block (`layer_0` self-attention, `layer_1` FF) or decoder block (`layer_0`
  causal self-attention, `layer_1` cross-attention, `layer_2` FF).

  `deterministic` and `decode` are attributes, not call arguments, so that the block can be
  wrapped by `nn.remat` and `nn.scan` without static arguments. `__call__` returns
  `(x, x)`: the carry and the per-layer output of a scan.
  """
  config: Config
  is_decoder: bool = False
  has_relative_bias: bool = False
  deterministic: bool = True
  decode: bool = False

  def setup(self):
    cfg = self.config
    self.layer_0 = SelfAttentionLayer(cfg, self.has_relative_bias, not self.is_decoder)
    if self.is_decoder:
      self.layer_1 = CrossAttentionLayer(cfg)
      self.layer_2 = FeedForwardLayer(cfg)
    else:
      self.layer_1 = FeedForwardLayer(cfg)

  def position_bias(self, q_len: int, k_len: int) -> Array:
    """float[1, H, Q, K] from this block's relative position table."""
    return self.layer_0.SelfAttention.position_bias(q_len, k_len)

  def decode_position_bias(self, q_len: int):
    """See `Attention.decode_position_bias`."""
    return self.layer_0.SelfAttention.decode_position_bias(q_len)

  def __call__(self, x: Array, bias: Array, encoded: Array | None = None,
               cross_bias: Array | None = None, first_step: Array | None = None):
    """float[B, T, D] -> (float[B, T, D], float[B, T, D])."""
    kw = dict(deterministic=self.deterministic)
    x = self.layer_0(x, bias, decode=self.decode, **kw)
    if self.is_decoder:
      x = self.layer_1(x, encoded, cross_bias, decode=self.decode, first_step=first_step, **kw)
      x = self.layer_2(x, **kw)
    else:
      x = self.layer_1(x, **kw)
    x = constrain(x, ("batch", "length", "embed"))
    return x, x

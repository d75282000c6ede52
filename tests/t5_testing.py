"""Tiny random Hugging Face T5 models shared by the T5 tests (PyTorch reference, CPU)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import torch
import transformers

# The test models are tiny: compile fast rather than run fast (XLA CPU compiles dominate).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fun, **kwargs):
  """`jax.jit` with cheap compiler options, for tests."""
  return jax.jit(fun, compiler_options=FAST_COMPILE, **kwargs)

# Tiny variants covering the architecture switches. Lengths in `batch()` exceed
# `relative_attention_max_distance` of "gated" so that the log-spaced buckets are used.
VARIANTS = {
    # FLAN-T5 style: gated-GELU, untied lm_head, d_kv * heads != d_model, more decoder
    # layers, non-default buckets and distance.
    "gated": dict(vocab_size=150, d_model=32, d_kv=12, num_heads=3, d_ff=48, num_layers=2,
                  num_decoder_layers=3, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, relative_attention_num_buckets=16,
                  relative_attention_max_distance=20),
    # Original T5 style: ReLU, tied and scaled output projection, fewer decoder layers.
    "relu": dict(vocab_size=120, d_model=48, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
                 num_decoder_layers=2, feed_forward_proj="relu", tie_word_embeddings=True),
    # transformers 5.x quirk: tie_word_embeddings=False on a fresh model keeps the modules
    # tied but drops the output scaling.
    "tied_unscaled": dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=40,
                          num_layers=2, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False),
}


@dataclasses.dataclass
class HFModel:
  """A saved tiny HF model: the torch module (eval mode) and its directory."""
  name: str
  model: transformers.T5ForConditionalGeneration
  path: str


def hf_config(variant: str) -> transformers.T5Config:
  return transformers.T5Config(**VARIANTS[variant], decoder_start_token_id=0, dropout_rate=0.1)


def build_hf(variant: str, directory: str, seed: int = 0) -> HFModel:
  """Builds, untie-assigns (for untied variants) and saves a random HF T5 model."""
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(hf_config(variant))
  if variant == "gated":
    cfg = model.config
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  model.eval()
  path = os.path.join(directory, variant)
  model.save_pretrained(path)
  return HFModel(variant, model, path)


def batch(vocab_size: int, b: int = 3, s: int = 40, t: int = 24, seed: int = 0) -> dict:
  """Random int32 tokens with right-padded sources and targets (one row unpadded)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, (b, s)).astype(np.int32)
  targets = rng.integers(2, vocab_size, (b, t)).astype(np.int32)
  src_len = np.array([s] + list(rng.integers(3, s, b - 1)))
  tgt_len = np.array([t] + list(rng.integers(2, t, b - 1)))
  input_mask = (np.arange(s)[None] < src_len[:, None]).astype(np.int32)
  target_mask = (np.arange(t)[None] < tgt_len[:, None]).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
  return dict(inputs=inputs, input_mask=input_mask, decoder_inputs=decoder_inputs,
              targets=targets, target_mask=target_mask)


def torch_forward(model, data: dict, **kwargs):
  """HF forward on a `batch()`; labels masked with -100 where the target is padding."""
  t = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
  labels = t["targets"].masked_fill(t["target_mask"] == 0, -100)
  return model(input_ids=t["inputs"], attention_mask=t["input_mask"],
               decoder_input_ids=t["decoder_inputs"], decoder_attention_mask=t["target_mask"],
               labels=labels, **kwargs)


def torch_logits(model, data: dict) -> np.ndarray:
  with torch.no_grad():
    return torch_forward(model, data).logits.numpy()


def random_params(cfg, seed: int = 0, std: float = 0.2) -> dict:
  """Random recjax T5 parameters without compiling an init (XLA CPU compiles are the slow
  part of these tests): embeddings N(0, 1), layer-norm scales 1 + N(0, 0.1), kernels
  N(0, std)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from recjax.models.t5 import T5

  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(T5(cfg).init, jax.random.key(0), ids, ids)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    x = rng.normal(0.0, 1.0, leaf.shape)
    x = 1.0 + 0.1 * x if name == "scale" else x if name == "embedding" else std * x
    return x.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)

"""Tiny joint-model configs, batches and jit options shared by the bridge/joint tests."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from recjax.models.bridge import BridgeConfig
from recjax.models.joint import JointConfig
from recjax.models.sasrec import SASRecConfig
from recjax.models.t5 import T5Config

# Tiny models: compile fast rather than run fast (XLA CPU compiles dominate).
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}

NUM_ITEMS = 39          # catalogue rows 0..39 = 40 (divisible by 8)
MAX_LEN = 8
PROMPT_LEN = 6
TITLE_LEN = 4
TARGETS = 3             # CRM positions scored per row

CRM = SASRecConfig(num_items=NUM_ITEMS, max_len=MAX_LEN, hidden=16, num_blocks=2,
                   num_heads=2, mlp_dim=32, dropout=0.1, attn_dropout=0.1,
                   item_table_multiple=8)
LLM = T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1,
               num_decoder_layers=1, dropout_rate=0.1, relative_attention_num_buckets=8,
               relative_attention_max_distance=16)
BRIDGE = BridgeConfig(memory_dim=16, num_soft_prompts=2, align_pairs=((0, 0), (1, 1)),
                      align_dim=8, user_memory=True, num_users=15)
CONFIG = JointConfig(CRM, LLM, BRIDGE)

OPTIM = ml_collections.ConfigDict(dict(
    lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
    schedule="constant", warmup_steps=0))


def config(**bridge_changes) -> JointConfig:
  return dataclasses.replace(CONFIG, bridge=dataclasses.replace(BRIDGE, **bridge_changes))


def batch(seed: int = 0, size: int = 16) -> dict[str, np.ndarray]:
  """A random joint batch (numpy, host)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, NUM_ITEMS + 1, (size, MAX_LEN)).astype(np.int32)
  inputs[:, :2] = 0
  inputs[0, :6] = 0      # a short history
  item_ids = np.where(rng.random((size, PROMPT_LEN)) < 0.3,
                      rng.integers(1, NUM_ITEMS + 1, (size, PROMPT_LEN)), 0)
  prompt_mask = np.ones((size, PROMPT_LEN), bool)
  prompt_mask[1, -2:] = False
  return {
      "inputs": inputs,
      "labels": rng.integers(1, NUM_ITEMS + 1, (size, TARGETS)).astype(np.int32),
      "mask": rng.random((size, TARGETS)) < 0.9,
      "llm_input_ids": rng.integers(2, LLM.vocab_size, (size, PROMPT_LEN)).astype(np.int32),
      "llm_input_mask": prompt_mask,
      "llm_item_ids": item_ids.astype(np.int32),
      "user_ids": rng.integers(0, BRIDGE.num_users + 1, (size,)).astype(np.int32),
      "target": rng.integers(1, NUM_ITEMS + 1, (size,)).astype(np.int32),
      "target_mask": np.arange(size) != 2,
  }


def catalogue(seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.ones((NUM_ITEMS + 1, TITLE_LEN), bool)
  mask[:, -1] = rng.random(NUM_ITEMS + 1) < 0.5
  mask[0] = False        # padding item: no title
  return {"title_ids": rng.integers(2, LLM.vocab_size,
                                    (NUM_ITEMS + 1, TITLE_LEN)).astype(np.int32),
          "title_mask": mask}


def jit(fun, **kwargs):
  return jax.jit(fun, compiler_options=FAST_COMPILE, **kwargs)

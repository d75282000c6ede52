"""Title generation from the joint model: constrained beam search over the catalogue."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from recjax import decoding
from recjax.models.t5 import T5
from recjax.train.joint_task import JointTask, TitleIndex

import joint_testing as jt


def test_title_index_maps_titles_to_items():
  ids = np.array([[0, 0, 0], [5, 6, 1], [7, 0, 0], [5, 6, 0], [0, 0, 0]], np.int32)
  mask = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
  index = TitleIndex.build(ids, mask, eos_id=1)
  assert index.items_of == {(5, 6): (1, 3), (7,): (2,)}   # eos stripped, duplicates share
  assert index.untitled == 1                              # item 4 has no title tokens
  generated = np.array([[[7, 1, 0], [5, 6, 1]], [[5, 6, 1], [9, 9, 1]]], np.int32)
  np.testing.assert_array_equal(index.rank(generated, 3), [[2, 1, 3], [1, 3, 0]])


def test_inputs_embeds_generate_like_input_ids():
  module = T5(jt.LLM.replace(dropout_rate=0.0))
  rng = np.random.default_rng(0)
  ids = rng.integers(2, jt.LLM.vocab_size, (3, 5)).astype(np.int32)
  mask = np.ones((3, 5), np.int32)
  mask[1, -2:] = 0
  params = module.init(jax.random.key(0), ids, ids[:, :1])["params"]
  params = nn.meta.unbox(params)
  embeds = module.apply({"params": params}, ids, method=lambda m, x: m.shared(x))
  a = decoding.generate(module, params, ids, mask, max_decode_len=4, method="beam",
                        num_beams=2)
  b = decoding.generate(module, params, None, mask, max_decode_len=4, method="beam",
                        num_beams=2, inputs_embeds=embeds)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-6)


def test_joint_model_generates_catalogue_titles():
  task = JointTask(jt.CONFIG)
  params = nn.meta.unbox(task.init(jax.random.key(0)))
  catalogue = jt.catalogue()
  index = TitleIndex.build(catalogue["title_ids"], catalogue["title_mask"])
  batch = jt.batch(0, size=4)
  items, titles, scores = task.generate(params, batch, catalogue, index, num_beams=3)
  titles, scores = np.asarray(titles), np.asarray(scores)
  assert items.shape == (4, 3) and titles.shape[:2] == (4, 3)
  for row in range(4):
    generated = [index.title(t) for t in titles[row]]
    assert all(t in index.items_of for t in generated), generated
    assert len(set(generated)) == 3                       # distinct beams
    assert np.all(np.diff(scores[row]) <= 0)              # best first
    assert set(items[row]) <= set(range(1, jt.NUM_ITEMS + 1))
    assert items[row][0] in index.items_of[generated[0]]
  # The soft prompts carry the SASRec user state: another history, another prompt.
  other = dict(batch, inputs=np.roll(batch["inputs"], 1, axis=1))
  x1, _ = task.model.apply({"params": params}, batch, catalogue,
                           method=type(task.model).generation_inputs)
  x2, _ = task.model.apply({"params": params}, other, catalogue,
                           method=type(task.model).generation_inputs)
  k = jt.BRIDGE.num_soft_prompts
  assert not np.allclose(x1[:, :k], x2[:, :k])
  np.testing.assert_array_equal(np.asarray(x1[:, k:]), np.asarray(x2[:, k:]))


def test_without_text_head_there_is_no_lm_head_and_no_generation():
  task = JointTask(dataclasses.replace(jt.CONFIG, text_head=False))
  shapes = jax.eval_shape(task.init, jax.random.key(0))
  assert "lm_head" not in shapes["llm"] and "lm_head" in jax.eval_shape(
      JointTask(jt.CONFIG).init, jax.random.key(0))["llm"]
  catalogue = jt.catalogue()
  index = TitleIndex.build(catalogue["title_ids"], catalogue["title_mask"])
  with pytest.raises(ValueError, match="llm.text_head"):
    task.generate({}, jt.batch(0, size=2), catalogue, index)

"""The bridge: each direction owns exactly its parameters, and each one carries
information the way it claims to."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from recjax.models.joint import JointModel
from recjax.train.joint_task import JointTask

import joint_testing as jt


def _paths(cfg) -> set[str]:
  shapes = jax.eval_shape(lambda r: nn.unbox(JointTask(cfg).init(r)), jax.random.key(0))
  return {"/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(shapes)}


@pytest.fixture(scope="module")
def full_paths():
  return _paths(jt.CONFIG)


@pytest.mark.parametrize("switch,owned", [
    (dict(crm_to_llm=False), ["bridge/crm_to_llm/"]),
    (dict(item_tokens=False), ["bridge/item_tokens/"]),
    (dict(llm_to_crm=False), ["bridge/llm_to_crm/"]),
    (dict(user_memory=False), ["bridge/memory/user_memory"]),
    (dict(align_pairs=()), ["bridge/align_0/", "bridge/align_1/"]),
])
def test_switching_a_direction_off_removes_exactly_its_parameters(full_paths, switch,
                                                                  owned):
  removed = full_paths - _paths(jt.config(**switch))
  assert removed, switch
  assert all(any(p.startswith(o) for o in owned) for p in removed), removed
  assert all(any(p.startswith(o) for o in owned) == (p in removed) for p in full_paths)


def test_towers_and_shared_memory(full_paths):
  assert {p.split("/")[0] for p in full_paths} == {"crm", "llm", "bridge"}
  assert {"bridge/memory/item_memory", "bridge/memory/to_crm/kernel",
          "bridge/memory/to_llm/kernel", "bridge/llm_head/head_proj/kernel"} <= full_paths
  # The "llm" tree is the whole T5 (token head included) and nothing else.
  from recjax.models.t5 import T5
  t5 = jax.eval_shape(lambda r: nn.unbox(T5(jt.LLM).init(
      r, np.ones((1, 3), np.int32), np.ones((1, 2), np.int32))["params"]),
      jax.random.key(0))
  t5_paths = {"llm/" + "/".join(str(k.key) for k in path)
              for path, _ in jax.tree_util.tree_leaves_with_path(t5)}
  assert {p for p in full_paths if p.startswith("llm/")} == t5_paths


@pytest.fixture(scope="module")
def params():
  task = JointTask(jt.CONFIG)
  return jt.jit(lambda r: nn.unbox(task.init(r)))(jax.random.key(0))


@pytest.fixture(scope="module")
def scores_fn(params):
  fn = jt.jit(lambda b, c: JointModel(jt.CONFIG).apply(
      {"params": params}, b, c, method=JointModel.scores))
  return lambda b, c: tuple(np.asarray(x) for x in fn(b, c))


def test_cached_title_table_equals_in_step_titles(params, scores_fn):
  """title_mode "cache" with a fresh `encode_titles` table == "step" mode."""
  cached = JointTask(dataclasses.replace(jt.CONFIG, title_mode="cache"))
  catalogue = jt.catalogue()
  table = jt.jit(cached.encode_titles)(params, catalogue["title_ids"],
                                        catalogue["title_mask"])
  assert table.shape == (jt.NUM_ITEMS + 1, jt.LLM.d_model)
  crm, llm = jt.jit(cached.scores)(params, jt.batch(), {"title_table": table})
  ref_crm, ref_llm = scores_fn(jt.batch(), catalogue)
  np.testing.assert_allclose(np.asarray(crm), ref_crm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(llm), ref_llm, rtol=1e-5, atol=1e-5)


def test_each_direction_carries_information(scores_fn):
  batch, catalogue = jt.batch(), jt.catalogue()
  crm, llm = scores_fn(batch, catalogue)
  assert crm.shape == llm.shape == (16, jt.NUM_ITEMS + 1)

  # Item tokens: a placeholder's embedding comes from the memory, not its token id ...
  b = dict(batch)
  where = b["llm_item_ids"] > 0
  assert where.any()
  b["llm_input_ids"] = np.where(where, 3, b["llm_input_ids"]).astype(np.int32)
  np.testing.assert_array_equal(scores_fn(b, catalogue)[1], llm)
  # ... and changing the item changes the LLM's scores (not the CRM's).
  b = dict(batch)
  b["llm_item_ids"] = np.where(where, (b["llm_item_ids"] % jt.NUM_ITEMS) + 1, 0
                               ).astype(np.int32)
  crm2, llm2 = scores_fn(b, catalogue)
  np.testing.assert_array_equal(crm2, crm)
  assert not np.allclose(llm2[where.any(1)], llm[where.any(1)])

  # CRM -> LLM: the history reaches the LLM through the soft prompts.
  b = dict(batch)
  b["inputs"] = np.roll(b["inputs"], 1, axis=0)
  crm3, llm3 = scores_fn(b, catalogue)
  assert not np.allclose(llm3, llm) and not np.allclose(crm3, crm)

  # LLM -> CRM: item titles change the CRM's scores (through the gated title fusion).
  c = dict(catalogue)
  c["title_ids"] = np.roll(c["title_ids"], 1, axis=0)
  crm4, _ = scores_fn(batch, c)
  assert not np.allclose(crm4, crm)


def test_experiment_configs_build_their_shapes():
  """joint_ml100k (a small T5 from scratch) and joint_flan_t5_plan (a FLAN-T5 preset)."""
  import importlib.util
  from recjax.train import stages
  from recjax.train.joint_task import build_joint_task
  import os

  def load(name, *args):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)

  for config, d_model in ((load("joint_ml100k.py"), 128),
                          (load("joint_flan_t5_plan.py", "flan-t5-small"), 512)):
    task = build_joint_task(config, num_items=1682)
    shapes = jax.eval_shape(lambda r: nn.unbox(task.init(r)), jax.random.key(0))
    assert shapes["llm"]["shared"]["embedding"].shape == (32128, d_model)
    assert shapes["bridge"]["memory"]["item_memory"].shape == (1688, 64)
    assert shapes["bridge"]["crm_to_llm"]["prompt"]["kernel"].shape == (64, 4 * d_model)
    assert stages.get_schedule(config.loss.schedule)
  config = load("joint_ml100k.py")
  with config.unlocked():
    config.crm.history_bias = True
  with pytest.raises(ValueError, match="crm.history_bias"):
    build_joint_task(config, num_items=1682)



def test_align_crm_pool_last_reads_the_state_after_the_last_item(params):
  """align_crm_pool="last": g_crm reads SASRec's block output at the last position (and the
  last block then runs at the scored positions only); "mean" pools the window. Same params,
  same CRM and LLM outputs; only the alignment's SASRec side differs, as specified."""
  batch, catalogue = jt.batch(), jt.catalogue()

  def run(pool):
    model = JointModel(jt.config(align_crm_pool=pool))
    return jt.jit(lambda b, c: model.apply({"params": params}, b, c,
                                           num_targets=jt.TARGETS))(batch, catalogue)
  last, mean = run("last"), run("mean")
  np.testing.assert_allclose(last["crm_logits"], mean["crm_logits"], atol=1e-5)
  np.testing.assert_allclose(last["llm_logits"], mean["llm_logits"], atol=1e-5)

  def block_states(m, b, c):        # every block at every position ("mean" never cuts)
    _, extra, _ = m.item_tables(m.title_table(c, True))
    return m.crm_forward(b["inputs"], extra, deterministic=True)[1]
  blocks = jt.jit(lambda b, c: nn.apply(block_states, JointModel(jt.CONFIG))(
      {"params": params}, b, c))(batch, catalogue)
  valid = batch["inputs"] != 0
  for j, (_, block) in enumerate(jt.BRIDGE.align_pairs):
    h = np.asarray(blocks[block])
    g = params["bridge"][f"align_{j}"]["g_crm"]
    project = lambda x: x @ np.asarray(g["kernel"]) + np.asarray(g["bias"])
    pooled_mean = (h * valid[..., None]).sum(1) / np.maximum(valid.sum(1), 1)[:, None]
    np.testing.assert_allclose(last["align"][j][1], project(h[:, -1]), atol=1e-5)
    np.testing.assert_allclose(mean["align"][j][1], project(pooled_mean), atol=1e-5)
    np.testing.assert_allclose(last["align"][j][0], mean["align"][j][0], atol=1e-5)
  with pytest.raises(ValueError, match="align_crm_pool"):
    jt.config(align_crm_pool="max")

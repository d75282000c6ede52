"""The joint objective and step: gradients reach every tower, frozen towers stay bitwise
unchanged, stages switch without recompiling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from recjax import sharding as shd
from recjax.train import joint_step
from recjax.train import optimizer as optim_lib
from recjax.train import stages
from recjax.train.joint_task import (JointTask, kl_divergence, stage_controls,
                                     trainable_mask)

import joint_testing as jt

ALL_ON = {"crm": 1.0, "llm": 1.0, "kl": 0.5, "layer": 0.3}
ALL_TRAIN = {"crm": True, "llm": True, "bridge": True}


def _np(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_gradients_reach_every_tower_and_leaf(staged_run):
  task = JointTask(jt.CONFIG, kl_stop_grad="none")
  params = staged_run[1][0][1].params          # the initial parameters
  controls = stage_controls(ALL_ON, ALL_TRAIN, params, jt.catalogue())
  grad_fn = jt.jit(jax.grad(task.loss, has_aux=True))
  grads, metrics = grad_fn(params, jt.batch(), jax.random.key(1), controls)
  for term in ("crm", "llm", "kl", "layer"):
    assert float(metrics[f"loss_{term}"]) > 0, term
  assert set(grads) == {"crm", "llm", "bridge"}
  zero = [jax.tree_util.keystr(path) for path, g in
          jax.tree_util.tree_leaves_with_path(grads) if not np.any(np.asarray(g))]
  # The item head replaces T5's token head (lm_head unused), and the decoder runs one
  # step, where self-attention over a single key is constant (q, k, its position bias).
  attn = "['llm']['decoder']['block_0']['layer_0']['SelfAttention']"
  assert sorted(zero) == sorted([
      "['llm']['lm_head']['kernel']", f"{attn}['q']['kernel']", f"{attn}['k']['kernel']",
      f"{attn}['relative_attention_bias']['embedding']"]), zero


@pytest.mark.parametrize("shielded", [False, True])
def test_llm_grad_to_crm_switch(staged_run, shielded):
  """bridge.llm_grad_to_crm=False: the LLM loss leaves every SASRec parameter untouched."""
  task = JointTask(jt.config(llm_grad_to_crm=not shielded))
  params = staged_run[1][0][1].params
  controls = stage_controls({"llm": 1.0}, ALL_TRAIN, params, jt.catalogue())
  grads, _ = jt.jit(jax.grad(task.loss, has_aux=True))(params, jt.batch(), jax.random.key(1),
                                                        controls)
  crm_norm = float(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads["crm"])))
  assert (crm_norm == 0.0) == shielded, crm_norm
  memory = np.asarray(grads["bridge"]["memory"]["item_memory"])   # SASRec reads it too
  assert (not np.any(memory)) == shielded
  assert float(sum(np.sum(np.abs(np.asarray(g))) for g in jax.tree.leaves(grads["llm"]))) > 0


def test_kl_direction_and_stop_gradient():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  mask = jnp.array([True, True, False])
  fwd, n = kl_divergence(a, b, mask, direction="crm_llm", stop_grad="none")
  rev, _ = kl_divergence(a, b, mask, direction="llm_crm", stop_grad="none")
  p = jax.nn.softmax(a[:, 1:]); q = jax.nn.softmax(b[:, 1:])
  ref = np.sum(p * (np.log(p) - np.log(q)), -1)[:2].sum()
  np.testing.assert_allclose(float(fwd), ref, rtol=1e-5)
  assert float(n) == 2 and abs(float(rev) - float(fwd)) > 1e-4
  self_kl, _ = kl_divergence(a, a, mask)
  assert abs(float(self_kl)) < 1e-6
  ga = jax.grad(lambda x: kl_divergence(x, b, mask, stop_grad="crm")[0])(a)
  gb = jax.grad(lambda y: kl_divergence(a, y, mask, stop_grad="crm")[0])(b)
  assert not np.any(np.asarray(ga)) and np.any(np.asarray(gb))
  assert not np.any(np.asarray(gb)[2])   # masked row


# Parts of towers by path pattern: T5 without its first encoder block, the soft prompts
# alone of the bridge, SASRec frozen.
PARTIAL = stages.Stage("partial", 1.0, {"crm": 1.0, "llm": 1.0, "kl": 0.5},
                       {"llm": True, "llm/encoder/block_0": False,
                        "bridge/crm_to_llm/.*": True})


@pytest.fixture(scope="module")
def staged_run():
  """One compiled step, driven through the CoReLLa stages and a frozen-CRM stage."""
  task = JointTask(jt.CONFIG)
  traces = []

  def loss_fn(params, batch, rng, controls):
    traces.append(1)
    return task.loss(params, batch, rng, controls)

  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx = joint_step.make_joint_optimizer(jt.OPTIM, 100)
  state, sharding = joint_step.create_joint_train_state(
      task.init, tx, mesh, "dp", jax.random.key(0), compiler_options=jt.FAST_COMPILE)
  step = joint_step.make_joint_train_step(loss_fn, tx, sharding, mesh,
                                          compiler_options=jt.FAST_COMPILE)
  catalogue = jt.catalogue()
  history = [("init", _np(state), None)]
  plan = [stages.controls(s, state.params, catalogue)
          for s in stages.SCHEDULES["corella"]]
  plan += [stages.controls(stages.SCHEDULES["joint"][0], state.params, catalogue)]
  plan += [stages.controls(s, state.params, catalogue)
           for s in stages.SCHEDULES["delrec"]]
  plan += [stages.controls(PARTIAL, state.params, catalogue)]
  for i, controls in enumerate(plan):
    state, metrics = step(state, shd.global_batch(jt.batch(i), mesh), jax.random.key(1),
                          controls)
    history.append((i, _np(state), _np(metrics)))
  return plan, history, traces


def test_stages_do_not_recompile(staged_run):
  plan, history, traces = staged_run
  assert len(plan) == 7
  assert len(traces) == 1, f"step traced {len(traces)} times"


def _same(a, b):
  return jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)


def test_frozen_parameters_are_bitwise_unchanged(staged_run):
  """Every frozen parameter, and its optimizer moments, is bitwise unchanged; trainable
  ones move; a tower's step count advances iff any of its parameters trains."""
  plan, history, _ = staged_run
  for k, controls in enumerate(plan):
    before, after, metrics = history[k][1], history[k + 1][1], history[k + 1][2]
    flags = controls["trainable"]
    same = _same(before.params, after.params)
    for (path, flag), equal in zip(jax.tree_util.tree_leaves_with_path(flags),
                                   jax.tree.leaves(same)):
      assert bool(flag) or equal, (k, jax.tree_util.keystr(path))
    moved = [not e for f, e in zip(jax.tree.leaves(flags), jax.tree.leaves(same)) if bool(f)]
    assert any(moved), k
    for tower in ("crm", "llm", "bridge"):
      any_trains = any(bool(f) for f in jax.tree.leaves(flags[tower]))
      mu_before = optax.tree_map_params(  # the moments of frozen parameters are kept
          joint_step.make_joint_optimizer(jt.OPTIM, 100).txs[tower],
          lambda p, f: None if bool(f) else p, before.opt_state[tower], flags[tower],
          transform_non_params=lambda _: None)
      mu_after = optax.tree_map_params(
          joint_step.make_joint_optimizer(jt.OPTIM, 100).txs[tower],
          lambda p, f: None if bool(f) else p, after.opt_state[tower], flags[tower],
          transform_non_params=lambda _: None)
      assert all(jax.tree.leaves(_same(mu_before, mu_after))), (k, tower)
      counts = [(path, a, b) for (path, a), b in zip(
          jax.tree_util.tree_leaves_with_path(before.opt_state[tower]),
          jax.tree.leaves(after.opt_state[tower])) if "count" in jax.tree_util.keystr(path)]
      assert counts
      for path, a, b in counts:
        assert (int(b) == int(a) + 1) == any_trains, (k, tower, path)
      if any_trains:
        assert metrics[f"update_norm/{tower}"] > 0
      else:
        assert metrics[f"update_norm/{tower}"] == 0


def test_crm_frozen_stages_keep_everything_the_crm_reads(staged_run):
  """CoReLLa S3 and DELRec S1/S2 freeze the CRM: its tower and the bridge parts that build
  its item embeddings (item memory, its CRM view, title fusion) are bitwise unchanged,
  while the LLM side of the bridge trains where the stage says so."""
  plan, history, _ = staged_run
  crm_side = ("bridge/memory/item_memory", "bridge/memory/to_crm", "bridge/llm_to_crm")
  for k, bridge_trains in ((2, True), (4, True), (5, False)):   # s3_llm, s1_distil, s2_tune
    before, after = history[k][1].params, history[k + 1][1].params
    moved = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before),
                            jax.tree.leaves(after)):
      name = "/".join(str(getattr(p, "key", p)) for p in path)
      moved[name] = not np.array_equal(a, b)
    assert not any(m for n, m in moved.items()
                   if n.startswith("crm/") or n.startswith(crm_side)), k
    assert any(m for n, m in moved.items() if n.startswith("bridge/crm_to_llm")) == \
        bridge_trains, k
    assert any(n.startswith(crm_side[2]) for n in moved)  # the test model has title fusion


def test_partial_stage_trains_by_path_pattern(staged_run):
  plan, history, _ = staged_run
  flags = plan[-1]["trainable"]
  assert not any(bool(f) for f in jax.tree.leaves(flags["crm"]))
  assert not any(bool(f) for f in jax.tree.leaves(flags["llm"]["encoder"]["block_0"]))
  assert all(bool(f) for f in jax.tree.leaves(flags["llm"]["decoder"]))
  bridge = {jax.tree_util.keystr(p): bool(f)
            for p, f in jax.tree_util.tree_leaves_with_path(flags["bridge"])}
  assert bridge and all(v == ("crm_to_llm" in k) for k, v in bridge.items()), bridge


def test_trainable_patterns_last_match_wins_and_typos_fail():
  params = {"crm": {"emb": np.zeros(2)}, "llm": {"lm_head": {"kernel": np.zeros(2)},
                                                   "enc": {"kernel": np.zeros(2)}}}
  flags = trainable_mask({"llm": True, "llm/lm_head": False}, params)
  assert jax.tree.map(bool, flags) == {
      "crm": {"emb": False}, "llm": {"lm_head": {"kernel": False}, "enc": {"kernel": True}}}
  flags = trainable_mask({"llm/lm_head": False, "llm": True}, params)
  assert bool(flags["llm"]["lm_head"]["kernel"])
  flags = trainable_mask({".*/kernel": True}, params)
  assert not bool(flags["crm"]["emb"]) and bool(flags["llm"]["enc"]["kernel"])
  with pytest.raises(ValueError, match="'llm/lm_haed' matches no parameter"):
    trainable_mask({"llm/lm_haed": False}, params)
  # "?" marks an optional part: it may match nothing (a tied T5 has no lm_head).
  tied = {"crm": params["crm"], "llm": {"enc": params["llm"]["enc"]}}
  flags = trainable_mask({"llm": True, "?llm/lm_head": False}, tied)
  assert bool(flags["llm"]["enc"]["kernel"])
  flags = trainable_mask({"llm": True, "?llm/lm_head": False}, params)
  assert not bool(flags["llm"]["lm_head"]["kernel"])


def test_built_in_stages_freeze_the_token_head():
  """No loss term reaches T5's lm_head; where T5 trains it stays frozen, so weight decay
  cannot shrink a pretrained head that title generation reads."""
  params = jax.eval_shape(JointTask(jt.CONFIG).init, jax.random.key(0))
  assert "lm_head" in params["llm"]
  for name, schedule in stages.SCHEDULES.items():
    for stage in schedule:
      flags = trainable_mask(dict(stage.trainable), params)
      assert not any(bool(f) for f in jax.tree.leaves(flags["llm"]["lm_head"])), (
          name, stage.name)


def test_metrics_report_every_term_and_tower(staged_run):
  plan, history, _ = staged_run
  metrics = history[4][2]      # the "joint" stage: every weight non-zero
  for term in ("crm", "llm", "kl", "layer"):
    assert np.isfinite(metrics[f"loss_{term}"]) and metrics[f"loss_{term}"] > 0
    assert metrics[f"weight_{term}"] == float(plan[3]["weights"][term])
  for tower in ("crm", "llm", "bridge"):
    assert metrics[f"grad_norm/{tower}"] > 0
  total = sum(metrics[f"weight_{t}"] * metrics[f"loss_{t}"]
              for t in ("crm", "llm", "kl", "layer"))
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)


FAKE_PARAMS = {"crm": {"w": np.zeros(1)}, "llm": {"w": np.zeros(1)},
               "bridge": {"llm_head": {"w": np.zeros(1)}, "memory": {"to_crm": {"w": np.zeros(1)}}}}


def test_schedules_are_data():
  for name, schedule in stages.SCHEDULES.items():
    starts = stages.stage_boundaries(schedule, 100)
    assert starts[0] == 0 and starts == sorted(starts), name
    assert stages.stage_at(schedule, 99, 100) is schedule[-1]
    structure = {jax.tree.structure(stages.controls(s, FAKE_PARAMS)) for s in schedule}
    assert len(structure) == 1
  corella = stages.SCHEDULES["corella"]
  assert [dict(s.weights) for s in corella] == [
      {"crm": 1.0}, {"crm": 1.0, "llm": 1.0, "layer": 0.1}, {"llm": 1.0}]
  with pytest.raises(ValueError, match="unknown loss weights"):
    stage_controls({"crm": 1.0, "typo": 1.0}, {}, FAKE_PARAMS)


def _tower_update_jit(tx, mask):
  return jax.jit(lambda g, o, p: joint_step._tower_update(tx, g, o, p, p, mask, 0.9))


def test_partial_update_is_the_plain_update_of_the_trainable_part():
  """Frozen gradients, however large (or NaN), do not reach the trainable parameters
  through global-norm clipping: they move exactly as optax alone would move them."""
  tx = optim_lib.make_optimizer(jt.OPTIM, 10)          # AdamW, decay, clip 1.0
  params = {"a": jnp.arange(4.0), "b": jnp.ones(3)}
  grads = {"a": jnp.array([0.3, -0.2, 0.1, 0.5]), "b": jnp.array([1e6, jnp.nan, 3.0])}
  mask = {"a": jnp.asarray(True), "b": jnp.asarray(False)}
  new, opt, norm, ema = _tower_update_jit(tx, mask)(grads, tx.init(params), params)
  ref = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
      {"a": grads["a"]}, {"a": params["a"]})
  np.testing.assert_allclose(np.asarray(new["a"]), np.asarray(ref["a"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new["b"]), np.asarray(params["b"]))
  np.testing.assert_array_equal(np.asarray(ema["b"]), np.asarray(params["b"]))
  assert np.isfinite(float(norm)) and float(norm) > 0


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, False)])
def test_tower_update_adafactor_momentum_bfloat16(flags):
  """Every switch branch has the same output types, also when optax's updates are float32
  (Adafactor momentum) for bfloat16 parameters."""
  cfg = ml_collections.ConfigDict(dict(
      name="adafactor", lr=1.0, adafactor_momentum=0.9, schedule="constant",
      warmup_steps=0, weight_decay=0.0, grad_clip=0.0))
  tx = optim_lib.make_optimizer(cfg, 10)
  params = {"w": jnp.ones((256, 128), jnp.bfloat16), "v": jnp.ones((4,), jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  mask = {"w": jnp.asarray(flags[0]), "v": jnp.asarray(flags[1])}
  opt = tx.init(params)
  new, new_opt, norm, _ = _tower_update_jit(tx, mask)(grads, opt, params)
  for k, flag in zip(("w", "v"), flags):
    assert new[k].dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(new[k]), np.asarray(params[k])) != flag, k
  assert (float(norm) > 0) == any(flags)


def test_each_towers_schedule_spans_the_steps_it_trains():
  """A staged tower's step count advances only while it trains: its cosine schedule must
  reach its end on the tower's last step, not partway through."""
  params = jax.eval_shape(JointTask(jt.CONFIG).init, jax.random.key(0))
  assert stages.tower_steps(stages.SCHEDULES["corella"], 100, params) == {
      "crm": 70, "llm": 60, "bridge": 60}
  assert stages.tower_steps(stages.SCHEDULES["delrec"], 100, params) == {
      "crm": 0, "llm": 50, "bridge": 50}
  cfg = jt.OPTIM.copy_and_resolve_references()
  cfg.schedule, cfg.lr, cfg.weight_decay, cfg.grad_clip = "cosine", 1.0, 0.0, 0.0
  tx = joint_step.make_joint_optimizer(cfg, 100, towers=("crm",), tower_steps={"crm": 10})
  x = {"crm": jnp.zeros(())}
  state = tx.init(x)
  sizes = []
  for _ in range(10):
    u, state = tx.update({"crm": jnp.ones(())}, state, x)
    sizes.append(abs(float(u["crm"])))
  # Adam's first steps move by ~lr(t); cosine over 10 steps ends near 0 on step 10.
  assert sizes[0] > 0.9 and sizes[-1] < 0.05, sizes

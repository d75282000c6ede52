"""SASRec: shapes, logical axes, causality, padding invariance, losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.models.sasrec import SASRec, SASRecConfig
from recjax.train.sequential import SequentialTask

CFG = SASRecConfig(num_items=30, max_len=12, hidden=16, num_blocks=2,
                   num_heads=2, mlp_dim=32)


@pytest.fixture(scope="module", params=[False, True], ids=["postln", "preln"])
def model_and_params(request):
  cfg = SASRecConfig(**{**CFG.__dict__, "norm_first": request.param})
  model = SASRec(cfg)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  return model, nn.unbox(boxed)["params"], boxed["params"]


def _histories(rng, batch, length, num_items, min_len=1):
  out = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = rng.integers(min_len, length + 1)
    out[b, length - n:] = rng.integers(1, num_items + 1, n)
  return out


def test_every_parameter_has_logical_axes(model_and_params):
  _, params, boxed = model_and_params
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  assert params["item_embedding"]["embedding"].shape == (31, 16)


def test_output_shapes(model_and_params):
  model, params, _ = model_and_params
  ids = _histories(np.random.default_rng(0), 3, 12, 30)
  hidden = model.apply({"params": params}, ids)
  assert hidden.shape == (3, 12, 16)
  scores = model.apply({"params": params}, ids, method=SASRec.scores)
  assert scores.shape == (3, 31) and scores.dtype == jnp.float32


@pytest.mark.parametrize("num_outputs", [1, 5, 12])
def test_num_outputs_equals_the_last_positions(model_and_params, num_outputs):
  """Computing only the last S positions in the last block changes no value: hidden
  states, the per-block list, scores; and the gradients of a loss on them."""
  model, params, _ = model_and_params
  ids = _histories(np.random.default_rng(3), 4, 12, 30)   # padded rows included
  full, full_blocks = model.apply({"params": params}, ids, return_hidden=True)
  part, part_blocks = model.apply({"params": params}, ids, return_hidden=True,
                                  num_outputs=num_outputs)
  assert part.shape == (4, num_outputs, 16)
  np.testing.assert_allclose(part, full[:, -num_outputs:], atol=1e-6)
  np.testing.assert_allclose(part_blocks[0], full_blocks[0], atol=1e-6)
  np.testing.assert_allclose(part_blocks[-1], full_blocks[-1][:, -num_outputs:], atol=1e-6)

  def loss(p, n):
    h = model.apply({"params": p}, ids, num_outputs=n)[:, -num_outputs:]
    return jnp.sum(jnp.sin(model.apply({"params": p}, h, method=SASRec.score)))
  g_full, g_part = jax.grad(loss)(params, None), jax.grad(loss)(params, num_outputs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_full, g_part)
  with pytest.raises(ValueError, match="num_outputs"):
    model.apply({"params": params}, ids, num_outputs=13)


def test_causality(model_and_params):
  """The output at position t does not change when later items change."""
  model, params, _ = model_and_params
  rng = np.random.default_rng(1)
  ids = _histories(rng, 4, 12, 30, min_len=12)
  base = model.apply({"params": params}, ids)
  for t in (0, 5, 10):
    changed = ids.copy()
    changed[:, t + 1:] = rng.integers(1, 31, changed[:, t + 1:].shape)
    out = model.apply({"params": params}, changed)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)


def test_padding_invariance(model_and_params):
  """Real outputs ignore padding: its amount and the pad embedding row."""
  model, params, _ = model_and_params
  rng = np.random.default_rng(2)
  ids = _histories(rng, 5, 8, 30)
  short = model.apply({"params": params}, ids)
  wide = np.concatenate([np.zeros((5, 4), np.int32), ids], axis=1)
  long = model.apply({"params": params}, wide)[:, 4:]
  real = ids != 0
  np.testing.assert_allclose(np.asarray(long)[real], np.asarray(short)[real],
                             atol=1e-5)
  # Garbage in the padding embedding row changes nothing.
  p2 = jax.tree.map(lambda x: x, params)
  p2["item_embedding"]["embedding"] = params["item_embedding"][
      "embedding"].at[0].set(100.0)
  poked = model.apply({"params": p2}, ids)
  np.testing.assert_allclose(np.asarray(poked)[real], np.asarray(short)[real],
                             atol=1e-5)
  assert np.all(np.asarray(poked)[~real] == 0)


def test_dropout_is_active_only_in_training(model_and_params):
  model, params, _ = model_and_params
  ids = _histories(np.random.default_rng(3), 2, 12, 30)
  det = model.apply({"params": params}, ids)
  a = model.apply({"params": params}, ids, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  b = model.apply({"params": params}, ids, deterministic=False,
                  rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, det) and not np.allclose(a, b)


@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize("loss_type", ["ce", "bce"])
def test_losses_match_reference(loss_type, weighted):
  task = SequentialTask(CFG,
                        loss_type=loss_type, num_negatives=3)
  params = nn.unbox(task.init(jax.random.key(0)))
  rng = np.random.default_rng(4)
  inputs = _histories(rng, 4, 12, 30)
  labels = rng.integers(1, 31, (4, 3)).astype(np.int32)
  mask = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], bool)
  batch = {"inputs": inputs, "labels": labels, "mask": mask}
  weights = mask.astype(np.float64)
  if weighted:   # masked entries carry junk weights that must not count
    weights = rng.uniform(0.2, 3.0, (4, 3))
    batch["weights"] = weights.astype(np.float32)
    weights = np.where(mask, weights, 0.0)
  key = jax.random.key(5)
  loss, aux = task.loss(params, batch, key)
  np.testing.assert_allclose(aux["num_targets"], weights.sum(), rtol=1e-6)
  # Reference with the same dropout / negatives (the loss computes only the last 3
  # positions' outputs, which test_num_outputs_equals_the_last_positions pins down).
  dropout_rng, negative_rng = jax.random.split(key)
  h = np.asarray(task.model.apply({"params": params}, inputs,
                                  deterministic=False, num_outputs=3,
                                  rngs={"dropout": dropout_rng}))
  table = np.asarray(params["item_embedding"]["embedding"])
  logits = h @ table.T
  if loss_type == "ce":
    logits[..., 0] = -np.inf
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + \
        logits.max(-1)
    per = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  else:
    negs = np.asarray(jax.random.randint(negative_rng, (4, 3, 3), 1, 31))
    pos = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    neg = np.take_along_axis(logits, negs, -1)
    sig = lambda x: 1 / (1 + np.exp(-x))
    per = -np.log(sig(pos)) - np.log(1 - sig(neg)).sum(-1)
  ref = (per * weights).sum() / weights.sum()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_label_smoothing_matches_the_smoothed_target_distribution():
  """(1 - eps) on the label + eps / N on items 1..N; padding gets nothing."""
  from recjax import losses
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(3, 4, 9)).astype(np.float32)
  labels = rng.integers(1, 9, (3, 4)).astype(np.int32)
  mask = rng.random((3, 4)) < 0.7
  eps = 0.2
  total, count = losses.softmax_cross_entropy(logits, labels, mask, eps)
  x = logits.astype(np.float64)
  x[..., 0] = -np.inf
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  target = np.full(x.shape, eps / 8)
  target[..., 0] = 0.0
  np.put_along_axis(target, labels[..., None], 1 - eps + eps / 8, -1)
  per = -(target[..., 1:] * logp[..., 1:]).sum(-1)
  np.testing.assert_allclose(total, (per * mask).sum(), rtol=1e-5)
  assert count == mask.sum()
  plain, _ = losses.softmax_cross_entropy(logits, labels, mask)
  per0 = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(plain, (per0 * mask).sum(), rtol=1e-5)
  assert abs(float(total) - float(plain)) > 1e-3   # eps changes the loss
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.softmax_cross_entropy(logits, labels, mask, 1.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    SequentialTask(CFG, loss_type="bce", label_smoothing=0.1)


def test_history_bias_adds_a_learned_offset_to_seen_items_causally():
  cfg = SASRecConfig(**{**CFG.__dict__, "history_bias": True})
  model, plain = SASRec(cfg), SASRec(CFG)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))
  assert nn.unbox(boxed)["params"]["history_bias"] == 0.0     # starts as plain SASRec
  params = dict(nn.unbox(boxed)["params"], history_bias=jnp.float32(-3.0))
  base = {k: v for k, v in params.items() if k != "history_bias"}
  rng = np.random.default_rng(7)
  ids = _histories(rng, 4, 12, 30)
  ids[0, -3:] = [5, 5, 9]                                      # a repeat counts once
  hidden = plain.apply({"params": base}, ids)                  # [B, L, D], all positions
  ref = np.asarray(plain.apply({"params": base}, hidden, method=SASRec.score))
  got = np.asarray(model.apply({"params": params}, hidden, method=SASRec.score,
                               history_ids=ids))
  for b in range(4):
    for t in range(12):
      seen = np.zeros(31, bool)
      seen[ids[b, :t + 1]] = True
      seen[0] = False
      np.testing.assert_allclose(got[b, t], ref[b, t] - 3.0 * seen, rtol=1e-6, atol=1e-6)
  # The training loss's S < L outputs line up with the window's last S positions.
  tail = np.asarray(model.apply({"params": params}, hidden[:, -3:], method=SASRec.score,
                                history_ids=ids))
  np.testing.assert_allclose(tail, got[:, -3:], rtol=1e-6, atol=1e-6)
  # Evaluation scores: the whole window counts.
  scores = np.asarray(model.apply({"params": params}, ids, method=SASRec.scores))
  np.testing.assert_allclose(scores, got[:, -1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="history_bias"):
    model.apply({"params": params}, hidden, method=SASRec.score)
  # Causal: changing later items leaves earlier positions' logits alone.
  later = ids.copy()
  later[:, 8:] = rng.integers(1, 31, (4, 4))
  h2 = plain.apply({"params": base}, later)
  got2 = np.asarray(model.apply({"params": params}, h2, method=SASRec.score,
                                history_ids=later))
  np.testing.assert_allclose(got2[:, :8], got[:, :8], rtol=1e-5, atol=1e-5)


def test_history_bias_is_trained_by_the_ce_loss():
  cfg = SASRecConfig(**{**CFG.__dict__, "history_bias": True})
  task = SequentialTask(cfg)
  params = nn.unbox(task.init(jax.random.key(0)))
  rng = np.random.default_rng(8)
  inputs = _histories(rng, 4, 12, 30, min_len=6)
  labels = inputs[:, -3:].copy()                    # every target repeats a seen item
  batch = {"inputs": inputs, "labels": labels, "mask": np.ones((4, 3), bool)}
  grads = jax.grad(lambda p: task.loss(p, batch, jax.random.key(1))[0])(params)
  assert grads["history_bias"] < 0                  # raising it lowers this loss
  with pytest.raises(ValueError, match="history_bias"):
    SequentialTask(cfg, loss_type="bce")


def test_history_bias_with_a_padded_item_table_has_logical_axes():
  cfg = SASRecConfig(**{**CFG.__dict__, "history_bias": True, "item_table_multiple": 8})
  model = SASRec(cfg)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
  assert isinstance(boxed["history_bias"], nn.Partitioned)
  assert boxed["history_bias"].names == ()
  params = dict(nn.unbox(boxed), history_bias=jnp.float32(1.5))
  ids = _histories(np.random.default_rng(9), 3, 12, 30)
  scores = np.asarray(model.apply({"params": params}, ids, method=SASRec.scores))
  assert scores.shape == (3, 31)              # table rows 32, padding rows never scored
  plain_cfg = SASRecConfig(**{**CFG.__dict__, "item_table_multiple": 8})
  plain = np.asarray(SASRec(plain_cfg).apply(
      {"params": {k: v for k, v in params.items() if k != "history_bias"}},
      model.apply({"params": params}, ids, num_outputs=1), method=SASRec.score))[:, 0]
  seen = np.zeros((3, 31), bool)
  for b in range(3):
    seen[b, ids[b]] = True
  seen[:, 0] = False
  np.testing.assert_allclose(scores, plain + 1.5 * seen, rtol=1e-5, atol=1e-5)

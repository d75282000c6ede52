"""The joint training loop end to end on a tiny dataset: stages, heads, routing, resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from recjax.data import prompts as prompts_lib
from recjax.train import checkpoint as ckpt_lib
from recjax.train import joint_eval
from recjax.train import joint_loop
from recjax.train import joint_step
import loop_testing

JOINT_CONFIG = os.path.join(loop_testing.ROOT, "experiments", "joint_ml100k.py")

OVERRIDES = {
    "crm.max_len": 8, "crm.hidden": 16, "crm.mlp_dim": 32, "crm.dropout": 0.1,
    "crm.attn_dropout": 0.1,
    "llm.d_model": 32, "llm.d_kv": 16, "llm.num_heads": 2, "llm.d_ff": 64,
    "llm.num_layers": 2, "llm.num_decoder_layers": 1, "llm.dropout_rate": 0.0,
    "bridge.memory_dim": 16, "bridge.num_soft_prompts": 2, "bridge.align_dim": 8,
    "prompt.prompt_len": 32, "prompt.num_items": 4, "prompt.title_len": 4,
    "prompt.prefix": "watched", "prompt.suffix": "next",
    "text.vocab_size": 64,
    "input.stride": 2, "input.batch_size": 16,
    "optim.lr": 5e-3, "optim.tower_lr": {"llm": 5e-3}, "optim.warmup_steps": 10,
    "optim.ema_decay": 0.0,
    "train.num_epochs": 5, "train.eval_every_steps": 20, "train.log_every_steps": 10,
    "loss.schedule": "corella", "train.fast_compile": True,
    "eval.batch_size": 16,
    "routing.fractions": (0.0, 0.5, 1.0),
}


def joint_config(tmp_path):
  config = loop_testing.load_config_file(JOINT_CONFIG)
  prefix = loop_testing.write_tiny_atomic(str(tmp_path / "raw"))
  overrides = dict(OVERRIDES, **{"data.name": f"atomic:{prefix}",
                                 "data.data_dir": str(tmp_path / "raw"),
                                 "data.cache_dir": str(tmp_path / "cache"),
                                 "data.download": False})
  return loop_testing.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("joint")
  config = joint_config(tmp)
  workdir = str(tmp / "work")
  return config, workdir, joint_loop.train_and_evaluate_joint(config, workdir)


def test_results_heads_and_routing(uninterrupted):
  config, workdir, results = uninterrupted
  test = results["metrics"]["test"]
  curve = {row["llm_fraction"]: row for row in test["routing"]}
  assert sorted(curve) == [0.0, 0.5, 1.0]
  for k in ("ndcg@10", "hr@10", "mrr@20"):
    assert curve[0.0][k] == test["crm"][k]          # 0% routed = the CRM alone
    assert curve[1.0][k] == test["llm"][k]          # 100% routed = the LLM alone
  assert curve[0.5]["routed"] == 20                 # of 40 users
  # The tiny catalogue is learnable (random HR@10 = 10/120): the CRM must learn it.
  assert test["crm"]["hr@10"] > 0.3, test["crm"]
  # Three CoReLLa stages, the second and third on disjoint user subsets.
  stages = results["stages"]
  assert [s["stage"] for s in stages] == ["s1_crm", "s2_joint", "s3_llm"]
  assert stages[0]["num_users"] == 40 and stages[1]["num_users"] == 12
  assert sum(s["steps"] for s in stages) == results["steps"]
  with open(os.path.join(workdir, "routing_curve.json")) as f:
    assert json.load(f)["curve"] == test["routing"]
  assert os.path.exists(os.path.join(workdir, "routing_curve.png"))


def test_metrics_log_every_term(uninterrupted):
  _, workdir, _ = uninterrupted
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if "train/loss" in r]
  for key in ("loss_crm", "loss_llm", "loss_kl", "loss_layer", "grad_norm/crm",
              "grad_norm/llm", "grad_norm/bridge", "weight_layer"):
    assert f"train/{key}" in train[-1], sorted(train[-1])
  # Stage 1 trains only the CRM: the LLM weight is zero there, one in stage 3.
  assert train[0]["train/weight_llm"] == 0.0 and train[-1]["train/weight_llm"] == 1.0
  valid = [r for r in rows if "valid/crm/ndcg@10" in r]
  assert valid and all("valid/llm/ndcg@10" in r for r in valid)


class _Crash(Exception):
  pass


def test_resume_after_crash_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
  """A run that dies right after its first checkpoint (in stage 1) and is restarted
  replays the same batches, stages and title refreshes: identical results."""
  config, _, expected = uninterrupted
  workdir = str(tmp_path / "work")
  save = ckpt_lib.Checkpointer.save

  def save_then_crash(self, step, state, meta):
    save(self, step, state, meta)
    self.wait()
    raise _Crash(step)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_then_crash)
  with pytest.raises(_Crash) as crash:
    joint_loop.train_and_evaluate_joint(config, workdir)
  assert crash.value.args[0] == 20
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
  resumed = joint_loop.train_and_evaluate_joint(config, workdir)
  assert resumed["best_step"] == expected["best_step"]
  assert resumed["metrics"] == expected["metrics"]


def test_launcher_eval_mode_matches_training_results(uninterrupted):
  """`launch/main.py --mode=eval` dispatches a joint config to the joint loop."""
  config, workdir, expected = uninterrupted
  flags = [f"--config.{k}={loop_testing._flag_value(v)}"
           for k, v in _flat(config.to_dict()).items()
           if k.split(".")[0] in ("data", "crm", "llm", "bridge", "prompt", "text", "routing",
                                  "eval") or k == "train.fast_compile"]
  cmd = [sys.executable, loop_testing.LAUNCHER, f"--config={JOINT_CONFIG}",
         f"--workdir={workdir}", "--mode=eval", *flags]
  proc = subprocess.run(cmd, env=loop_testing.launch_env(1), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "routing (test" in proc.stdout
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  np.testing.assert_allclose(results["metrics"]["test"]["crm"]["ndcg@10"],
                             expected["metrics"]["test"]["crm"]["ndcg@10"], rtol=1e-6)
  np.testing.assert_allclose(results["metrics"]["test"]["llm"]["hr@10"],
                             expected["metrics"]["test"]["llm"]["hr@10"], rtol=1e-6)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif v is not None:
      out[f"{prefix}{k}"] = v
  return out


def test_llm_checkpoint_starts_from_the_hf_weights(tmp_path):
  """`llm.checkpoint`: a (tiny, random) Hugging Face T5 directory with a SentencePiece
  tokenizer replaces the from-scratch T5 and vocabulary, and the joint loop trains on it."""
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  config = joint_config(tmp_path)
  data, _, _, _ = joint_loop._setup(config)
  # A T5 checkpoint directory: spiece.model (T5 ids) + config.json + weights.
  _, sp_size, _ = prompts_lib.train_text_vocab(
      prompts_lib.item_texts(data.item_titles, data.item_info), 60, str(tmp_path / "spm"))
  ckpt_dir = tmp_path / "hf_t5"
  ckpt_dir.mkdir()
  spm = [p for p in (tmp_path / "spm").rglob("spiece.model")]
  os.replace(spm[0], ckpt_dir / "spiece.model")
  vocab = sp_size + 100                  # T5Tokenizer adds 100 <extra_id_*> sentinels
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=vocab, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
      num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      decoder_start_token_id=0, dropout_rate=0.0))
  hf.save_pretrained(str(ckpt_dir))
  config = loop_testing.apply_overrides(config, {
      "llm.checkpoint": str(ckpt_dir), "llm.vocab_size": vocab, "train.num_epochs": 1,
      "loss.schedule": "joint"})

  data, builder, task, mesh = joint_loop._setup(config)
  assert task.cfg.llm.vocab_size == vocab and not task.cfg.text_head
  tx = joint_step.make_joint_optimizer(config.optim, 10)
  state, sharding = joint_loop._create_state(config, task, tx, mesh, jax.random.key(0), True)
  state = joint_loop._load_llm_checkpoint(config, task, state, sharding)
  np.testing.assert_array_equal(np.asarray(state.params["llm"]["shared"]["embedding"]),
                                hf.shared.weight.detach().numpy())
  assert "lm_head" not in state.params["llm"]           # llm.text_head=False drops it
  # The prompts now use the checkpoint's tokenizer: every id inside its vocabulary.
  assert builder.catalogue()["title_ids"].max() < vocab

  results = joint_loop.train_and_evaluate_joint(config, str(tmp_path / "work"))
  assert np.isfinite(results["metrics"]["test"]["llm"]["ndcg@10"])


def test_llm_vocab_size_without_checkpoint_is_refused():
  """A T5 from scratch takes the trained vocabulary; a set llm.vocab_size would be
  silently overwritten, so it is an error (0, the default, is fine)."""
  config = loop_testing.apply_overrides(loop_testing.load_config_file(JOINT_CONFIG),
                                        {"llm.vocab_size": 512})
  with pytest.raises(ValueError, match="llm.vocab_size=512: only for a checkpoint"):
    joint_loop.build_task(config, num_items=20, vocab_size=100)
  config.llm.vocab_size = 0
  assert joint_loop.build_task(config, num_items=20, vocab_size=100).cfg.llm.vocab_size == 128


def test_nan_scores_are_an_error():
  """A diverged head's NaN scores stop the evaluation (RankingEvaluator's default)."""
  crm = np.zeros((2, 5), np.float32)
  llm = crm.copy()
  llm[1, 3] = np.nan
  target = np.array([1, 2], np.int32)
  with pytest.raises(FloatingPointError, match="1 of 2 users have NaN llm scores"):
    joint_eval.check_no_nan_scores("valid", {"crm": crm, "llm": llm}, target, None)
  exclude = np.zeros((2, 5), bool)
  exclude[1, 3] = True  # an excluded item's score is never read
  joint_eval.check_no_nan_scores("valid", {"crm": crm, "llm": llm}, target, exclude)


def test_monitor_of_a_metric_not_in_eval_ks_fails_before_training(tmp_path):
  config = joint_config(tmp_path)
  config.eval.ks = (5, 20)
  with pytest.raises(ValueError, match="train.monitor='crm/ndcg@10'"):
    joint_loop.train_and_evaluate_joint(config, str(tmp_path / "work"))


def test_bf16_parameters_with_a_moving_average_are_refused():
  """A bf16 EMA never moves (1 - decay) * (p - ema) rounds away); bf16 params alone warn."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ema, p = jnp.full((), 0.05, jnp.bfloat16), jnp.full((), 0.051, jnp.bfloat16)
  assert ema + (1 - 0.998) * (p - ema) == ema   # the reason
  with pytest.raises(ValueError, match="never moves"):
    joint_loop.check_bf16_params("bfloat16", 0.998)
  joint_loop.check_bf16_params("bfloat16", 0.0)
  joint_loop.check_bf16_params("float32", 0.998)

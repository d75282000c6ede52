"""Parity of recjax T5 with transformers' PyTorch T5 through `recjax.convert`."""

import fnmatch
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import t5_testing
from recjax.convert import load_t5_from_hf, save_t5_to_hf
from recjax.convert import t5_hf
from recjax.models.t5 import T5Config


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hf_t5"))
  return {v: t5_testing.build_hf(v, root) for v in t5_testing.VARIANTS}


@pytest.fixture(scope="module")
def loaded(hf_models):
  return {v: load_t5_from_hf(m.path) for v, m in hf_models.items()}


def _ce(logits, data):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, data["targets"])
  w = data["target_mask"].astype(jnp.float32)
  return jnp.sum(losses * w) / jnp.sum(w)


@pytest.fixture(scope="module")
def outputs(hf_models, loaded):
  """Per variant, on one padded batch: (loss, logits, grads in HF layout, hidden states)
  of both sides.

  One jitted value_and_grad per variant (XLA CPU compiles dominate the test time).
  """
  out = {}
  for variant, (module, params) in loaded.items():
    hf = hf_models[variant]
    data = t5_testing.batch(module.config.vocab_size, seed=1)

    def loss_fn(p, module=module, data=data):
      logits, hidden = module.apply({"params": p}, data["inputs"], data["decoder_inputs"],
                                    data["input_mask"], data["target_mask"], return_hidden=True)
      return _ce(logits, data), (logits, hidden)

    grad_fn = t5_testing.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (logits, hidden)), grads = grad_fn(params)
    ours = (float(loss), np.asarray(logits),
            t5_hf.params_to_hf(jax.device_get(grads), module.config), jax.device_get(hidden))
    hf.model.zero_grad()
    ref = t5_testing.torch_forward(hf.model, data, output_hidden_states=True)
    ref.loss.backward()
    theirs = (ref.loss.item(), ref.logits.detach().numpy(),
              {n: p.grad.numpy().copy() for n, p in hf.model.named_parameters()},
              {"encoder": [h.detach().numpy() for h in ref.encoder_hidden_states],
               "decoder": [h.detach().numpy() for h in ref.decoder_hidden_states]})
    hf.model.zero_grad()
    out[variant] = ours, theirs
  return out


@pytest.mark.parametrize("variant", list(t5_testing.VARIANTS))
def test_config_and_logits_parity(loaded, outputs, variant):
  module, params = loaded[variant]
  cfg = module.config
  assert cfg.tie_word_embeddings == (variant != "gated")
  assert cfg.scale_decoder_outputs == (variant == "relu")
  assert ("lm_head" in params) == (variant == "gated")
  (_, ours, _, _), (_, ref, _, _) = outputs[variant]
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


@pytest.mark.parametrize("variant", list(t5_testing.VARIANTS))
def test_loss_and_gradient_parity(outputs, variant):
  (loss, _, grads, _), (ref_loss, _, ref_grads, _) = outputs[variant]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # Every parameter HF trains. A tied head appears once there, as shared.weight; the
  # export also writes it as lm_head.weight where config.json says untied (the
  # "tied_unscaled" quirk), with the same values.
  assert set(ref_grads) <= set(grads) and set(grads) - set(ref_grads) <= {"lm_head.weight"}
  if "lm_head.weight" not in ref_grads and "lm_head.weight" in grads:
    np.testing.assert_array_equal(grads["lm_head.weight"], grads["shared.weight"])
  for name, ref in ref_grads.items():
    err = np.abs(grads[name] - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("variant", ["gated", "relu"])
def test_hidden_states_match_transformers(loaded, outputs, variant):
  """Ours: embeddings, then every block's output (L + 1). HF's are the same except that
  its last entry is after the final layer norm."""
  cfg = loaded[variant][0].config
  (*_, ours), (*_, ref) = outputs[variant]
  for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
    assert len(ours[stack]) == len(ref[stack]) == n + 1
    for i in range(n):
      np.testing.assert_allclose(ours[stack][i], ref[stack][i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(t5_testing.VARIANTS))
def test_round_trip_through_transformers(hf_models, loaded, variant, tmp_path):
  hf, (module, params) = hf_models[variant], loaded[variant]
  save_t5_to_hf(module, params, str(tmp_path))
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  data = t5_testing.batch(module.config.vocab_size, seed=2)
  np.testing.assert_array_equal(t5_testing.torch_logits(reloaded, data),
                                t5_testing.torch_logits(hf.model, data))
  module2, params2 = load_t5_from_hf(str(tmp_path))
  assert module2.config == module.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_bfloat16(hf_models, loaded, tmp_path):
  """`save_t5_to_hf(..., dtype=bfloat16)` writes bf16 tensors that transformers loads."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  hf, (module, params) = hf_models["gated"], loaded["gated"]
  save_t5_to_hf(module, params, str(tmp_path), dtype=ml_dtypes.bfloat16)
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path), dtype=torch.float32).eval()
  data = t5_testing.batch(module.config.vocab_size, seed=2)
  got, want = t5_testing.torch_logits(reloaded, data), t5_testing.torch_logits(hf.model, data)
  assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
  assert np.abs(got - want).max() > 0  # rounded, not a float32 copy


def _state(hf):
  return safetensors.numpy.load_file(os.path.join(hf.path, "model.safetensors"))


def _write(directory, hf, state):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(hf.path, "config.json")) as f:
    config = f.read()
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(config)
  safetensors.numpy.save_file(state, os.path.join(directory, "model.safetensors"),
                              metadata={"format": "pt"})
  return str(directory)


def _save_bf16(model, directory):
  """A bfloat16 safetensors checkpoint of a (tied) HF model, as transformers saves one."""
  directory.mkdir()
  safetensors.torch.save_file({k: v.bfloat16().contiguous() for k, v in model.state_dict().items()
                               if k != "lm_head.weight"}, directory / "model.safetensors",
                              metadata={"format": "pt"})
  model.config.to_json_file(directory / "config.json")
  return directory


def test_refuses_missing_unexpected_and_misshaped(hf_models, tmp_path):
  hf = hf_models["gated"]
  state = _state(hf)
  del state["decoder.block.2.layer.2.DenseReluDense.wi_1.weight"]
  state["encoder.block.7.layer.0.SelfAttention.q.weight"] = np.zeros((36, 32), np.float32)
  state["encoder.block.1.layer.0.SelfAttention.o.weight"] = np.zeros((32, 12), np.float32)
  with pytest.raises(ValueError) as err:
    load_t5_from_hf(_write(tmp_path / "bad", hf, state))
  msg = str(err.value)
  assert "missing: decoder.block.2.layer.2.DenseReluDense.wi_1.weight (expected shape (48, 32))" in msg
  assert "unexpected: encoder.block.7.layer.0.SelfAttention.q.weight (shape (36, 32))" in msg
  assert "mis-shaped: encoder.block.1.layer.0.SelfAttention.o.weight expected (32, 36), got (32, 12)" in msg
  # An untied config without lm_head is refused too (transformers 4.x would initialise it).
  state = _state(hf)
  del state["lm_head.weight"]
  directory = _write(tmp_path / "no_head", hf, state)
  with open(os.path.join(directory, "config.json")) as f:
    config = {**json.load(f), "tie_word_embeddings": False}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="missing: lm_head.weight"):
    load_t5_from_hf(directory)


def test_embedding_duplicates_and_legacy_tensors(hf_models, loaded, tmp_path):
  hf, (_, params) = hf_models["gated"], loaded["gated"]
  state = _state(hf)
  state["encoder.embed_tokens.weight"] = state["shared.weight"].copy()
  state["decoder.embed_tokens.weight"] = state["shared.weight"].copy()
  state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = (
      np.zeros((16, 3), np.float32))
  _, params2 = load_t5_from_hf(_write(tmp_path / "dups", hf, state))
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # Only a stack's copy of the embedding.
  state["decoder.embed_tokens.weight"] = state.pop("shared.weight")
  _, params3 = load_t5_from_hf(_write(tmp_path / "only_dup", hf, state))
  jax.tree.map(np.testing.assert_array_equal, params3, params)
  state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] + 1
  with pytest.raises(ValueError, match="embed_tokens.weight differs from shared.weight"):
    load_t5_from_hf(_write(tmp_path / "differs", hf, state))


def test_sharded_bin_and_bfloat16_checkpoints(hf_models, loaded, tmp_path):
  hf, (_, params) = hf_models["relu"], loaded["relu"]
  sharded = str(tmp_path / "sharded")
  hf.model.save_pretrained(sharded, max_shard_size="50KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  jax.tree.map(np.testing.assert_array_equal, load_t5_from_hf(sharded)[1], params)
  # Legacy pytorch_model.bin (read with torch, lazily imported by recjax.convert).
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  torch.save(hf.model.state_dict(), legacy / "pytorch_model.bin")
  hf.model.config.to_json_file(legacy / "config.json")
  jax.tree.map(np.testing.assert_array_equal, load_t5_from_hf(str(legacy))[1], params)
  # bfloat16 safetensors, read without torch.
  bf16 = _save_bf16(hf.model, tmp_path / "bf16")
  _, params_bf16 = load_t5_from_hf(str(bf16))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2),
               params_bf16, params)
  module, half = load_t5_from_hf(str(bf16), param_dtype="bfloat16", dtype="bfloat16")
  assert module.config.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(half)} == {np.dtype(jnp.bfloat16)}


def test_safetensors_load_without_torch(hf_models, loaded, tmp_path):
  """Safetensors checkpoints (plain, sharded, bfloat16) load in a process where
  `import torch` fails, also beside a pytorch_model.bin index: safetensors win."""
  hf, (_, params) = hf_models["relu"], loaded["relu"]
  hf.model.save_pretrained(str(tmp_path / "plain"))
  hf.model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="50KB")
  bf16 = _save_bf16(hf.model, tmp_path / "bf16")
  both = tmp_path / "both"
  shutil.copytree(tmp_path / "plain", both)
  torch.save(hf.model.state_dict(), both / "pytorch_model-00001-of-00001.bin")
  with open(both / "pytorch_model.bin.index.json", "w") as f:
    json.dump({"weight_map": {"shared.weight": "pytorch_model-00001-of-00001.bin"}}, f)
  np.savez(tmp_path / "want.npz", **{"/".join(str(getattr(k, "key", k)) for k in path): leaf
                                     for path, leaf in jax.tree_util.tree_leaves_with_path(params)})
  code = (
      "import sys\n"
      "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
      "import jax, numpy as np\n"
      "from recjax.convert import load_t5_from_hf\n"
      f"root = {str(tmp_path)!r}\n"
      "want = np.load(root + '/want.npz')\n"
      "for name in ('plain', 'sharded', 'bf16', 'both'):\n"
      "  _, params = load_t5_from_hf(root + '/' + name)\n"
      "  got = {'/'.join(str(getattr(k, 'key', k)) for k in p): v\n"
      "         for p, v in jax.tree_util.tree_leaves_with_path(params)}\n"
      "  assert sorted(got) == sorted(want.files), name\n"
      "  tol = 1e-2 if name == 'bf16' else 0\n"
      "  for k in got: np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol)\n"
      "assert sys.modules['torch'] is None\n"
      "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_hub_ids_download_and_mistyped_paths(hf_models, loaded, tmp_path, monkeypatch):
  """A hub id goes through huggingface_hub.snapshot_download (faked here with local
  "repositories"): safetensors only, or .bin weights for a repository without them; a
  path that is not a directory nor a hub id fails at once, without the network."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  hf, (_, params) = hf_models["relu"], loaded["relu"]
  repos = {"org/new": tmp_path / "repo_new", "old-model": tmp_path / "repo_old"}
  hf.model.save_pretrained(str(repos["org/new"]))
  torch.save(hf.model.state_dict(), tmp_path / "pytorch_model.bin")
  repos["old-model"].mkdir()
  shutil.copy(tmp_path / "pytorch_model.bin", repos["old-model"])
  hf.model.config.to_json_file(repos["old-model"] / "config.json")
  calls = []

  def fake_snapshot_download(repo_id, allow_patterns):
    calls.append((repo_id, tuple(allow_patterns)))
    if repo_id not in repos:
      raise OSError(f"Repository Not Found for url: .../{repo_id}")
    out = tmp_path / "cache" / repo_id.replace("/", "--")
    out.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(repos[repo_id]):
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        shutil.copy(repos[repo_id] / name, out / name)
    return str(out)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  for repo_id in repos:
    calls.clear()
    _, got = load_t5_from_hf(repo_id)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert [c[0] for c in calls] == [repo_id] * (1 if repo_id == "org/new" else 2)
    assert "*.safetensors" in calls[0][1]
  for bad in (str(tmp_path / "missing"), "./missing", "a/b/c", str(tmp_path / "pytorch_model.bin")):
    calls.clear()
    with pytest.raises(FileNotFoundError, match="no such model directory"):
      load_t5_from_hf(bad)
    assert not calls
  # A mistyped relative path with one slash looks like a hub id: the failed fetch says so.
  with pytest.raises(FileNotFoundError, match="ckpts/flan: no such model directory, and "
                                              "fetching it as a hub id failed"):
    load_t5_from_hf("ckpts/flan")


def test_config_json_mapping():
  # config.json of google/flan-t5-small and google-t5/t5-small (architecture keys).
  flan = {"model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 1024,
          "num_layers": 8, "num_decoder_layers": 8, "num_heads": 6,
          "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
          "dropout_rate": 0.1, "layer_norm_epsilon": 1e-06, "feed_forward_proj": "gated-gelu",
          "dense_act_fn": "gelu_new", "is_gated_act": True, "tie_word_embeddings": False,
          "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
  assert t5_hf.config_from_hf(flan) == T5Config.preset("flan-t5-small")
  t5_small = {"model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64,
              "d_ff": 2048, "num_layers": 6, "num_heads": 8, "dropout_rate": 0.1,
              "layer_norm_epsilon": 1e-06, "feed_forward_proj": "relu",
              "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
  assert t5_hf.config_from_hf(t5_small) == T5Config.preset("t5-small")
  # The other presets: the architecture keys that differ in their config.json.
  sizes = ("d_model", "d_ff", "num_heads", "num_layers", "num_decoder_layers")
  published = {"flan-t5-base": (768, 2048, 12, 12, 12), "flan-t5-large": (1024, 2816, 16, 24, 24),
               "flan-t5-xl": (2048, 5120, 32, 24, 24), "flan-t5-xxl": (4096, 10240, 64, 24, 24)}
  for name, values in published.items():
    assert t5_hf.config_from_hf({**flan, **dict(zip(sizes, values))}) == T5Config.preset(name)
  t5_base = {**t5_small, "d_model": 768, "d_ff": 3072, "num_heads": 12, "num_layers": 12}
  assert t5_hf.config_from_hf(t5_base) == T5Config.preset("t5-base")
  for cfg in (T5Config.preset("flan-t5-small"), T5Config.preset("t5-small")):
    assert t5_hf.config_from_hf(t5_hf.config_to_hf(cfg)) == cfg
  with pytest.raises(ValueError, match="not a T5 config"):
    t5_hf.config_from_hf({"model_type": "bart"})


def test_scanned_load_and_save(hf_models, loaded, tmp_path):
  hf, (module, params) = hf_models["gated"], loaded["gated"]
  scanned_module, scanned = load_t5_from_hf(hf.path, scan_layers=True, remat_policy="full")
  assert scanned_module.config == module.config.replace(scan_layers=True, remat_policy="full")
  assert scanned["decoder"]["block_scan"]["layer_2"]["DenseReluDense"]["wo"]["kernel"].shape == (
      2, 48, 32)
  save_t5_to_hf(scanned_module, scanned, str(tmp_path))
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  data = t5_testing.batch(module.config.vocab_size, seed=3)
  np.testing.assert_array_equal(t5_testing.torch_logits(reloaded, data),
                                t5_testing.torch_logits(hf.model, data))

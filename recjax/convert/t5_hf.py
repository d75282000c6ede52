"""Hugging Face T5 / FLAN-T5 checkpoints <-> `recjax.models.t5` parameters.

The conversion is a rename plus a transpose/reshape per tensor (see `hf_layout`):
  HF `encoder.block.3.layer.1.DenseReluDense.wi_0.weight` [F, D]
  -> params["encoder"]["block_3"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"] [D, F]
  HF `...SelfAttention.q.weight` [H*Dk, D] -> `.../q/kernel` [D, H, Dk]
  HF `...SelfAttention.o.weight` [D, H*Dk] -> `.../o/kernel` [H, Dk, D]

Embedding tying: transformers 4.x ties (and scales the decoder output by d_model**-0.5) iff
`tie_word_embeddings`; 5.x always ties the modules but writes `scale_decoder_outputs` and
unties `lm_head.weight` when the checkpoint holds a different one. Loading follows 5.x:
tied iff `tie_word_embeddings` is true and `lm_head.weight` is absent or equal to
`shared.weight`. Saving writes a checkpoint both versions read the same way.

Reading safetensors needs no PyTorch (`safetensors.numpy`, bfloat16 via ml_dtypes);
`pytorch_model.bin` and hub downloads import torch / huggingface_hub inside the function.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from recjax.models.t5 import T5, T5Config, scan_params, unscan_params
from recjax.models.t5_layers import activation_name

# Tensors that HF checkpoints may hold and that carry no information of their own.
_EMBED_DUPLICATES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old checkpoints hold this unused table; transformers ignores it on load.
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

# config.json keys that map one-to-one onto T5Config fields (defaults: HF's).
_CONFIG_KEYS = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
    "num_decoder_layers": None, "num_heads": 8, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu", "decoder_start_token_id": 0, "pad_token_id": 0,
    "eos_token_id": 1,
}


def config_from_hf(hf: Mapping[str, Any], *, lm_head_tied: bool | None = None,
                   **overrides) -> T5Config:
  """T5Config from a config.json dict.

  Args:
    hf: the parsed config.json (model_type "t5" or "mt5").
    lm_head_tied: whether the checkpoint's output projection is `shared.weight` (see
      `_lm_head_tied`; None: trust `tie_word_embeddings`).
    **overrides: other T5Config fields (dtype, param_dtype, scan_layers, dropout_rate...).
  """
  if hf.get("model_type", "t5") not in ("t5", "mt5"):
    raise ValueError(f"not a T5 config: model_type={hf.get('model_type')!r}")
  kw = {k: hf.get(k, default) for k, default in _CONFIG_KEYS.items()}
  if kw["decoder_start_token_id"] is None:
    kw["decoder_start_token_id"] = kw["pad_token_id"]
  if isinstance(kw["eos_token_id"], (list, tuple)):
    kw["eos_token_id"] = kw["eos_token_id"][0]
  tie = bool(hf.get("tie_word_embeddings", True))
  kw["scale_decoder_outputs"] = bool(hf.get("scale_decoder_outputs", tie))
  kw["tie_word_embeddings"] = tie if lm_head_tied is None else lm_head_tied
  return T5Config(**{**kw, **overrides})


def config_to_hf(cfg: T5Config, dtype: Any = np.float32) -> dict[str, Any]:
  """config.json for `T5ForConditionalGeneration` (transformers 4.x and 5.x).

  `tie_word_embeddings` carries the output scaling (the rule of both versions); the weights
  decide the tying (see `hf_layout`).
  """
  out = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
         "is_encoder_decoder": True, "initializer_factor": 1.0, "use_cache": True,
         "dtype": np.dtype(dtype).name}
  out.update({k: getattr(cfg, k) for k in _CONFIG_KEYS})
  out["tie_word_embeddings"] = bool(cfg.scale_decoder_outputs)
  out["scale_decoder_outputs"] = bool(cfg.scale_decoder_outputs)
  return out


def _writes_lm_head(cfg: T5Config) -> bool:
  # HF ties and scales together; any other combination needs an explicit lm_head.
  return not (cfg.tie_word_embeddings and cfg.scale_decoder_outputs)


def hf_layout(cfg: T5Config, *, with_lm_head: bool | None = None
              ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
  """HF tensor name -> (recjax param path, HF shape, kind) for an unscanned tree.

  kind: "same" (identical layout), "linear" ([out, in] <-> kernel [in, out]),
  "qkv" ([H*Dk, D] <-> [D, H, Dk]), "o" ([D, H*Dk] <-> [H, Dk, D]).
  """
  d, h, dk, f, v = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size
  out = {"shared.weight": (("shared", "embedding"), (v, d), "same")}

  def attention(hf, path, relative):
    for p in "qkv":
      out[f"{hf}.{p}.weight"] = (path + (p, "kernel"), (h * dk, d), "qkv")
    out[f"{hf}.o.weight"] = (path + ("o", "kernel"), (d, h * dk), "o")
    if relative:
      out[f"{hf}.relative_attention_bias.weight"] = (
          path + ("relative_attention_bias", "embedding"),
          (cfg.relative_attention_num_buckets, h), "same")

  _, gated = activation_name(cfg.feed_forward_proj)
  for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
    for i in range(n):
      hf, path = f"{stack}.block.{i}.layer", (stack, f"block_{i}")
      sublayers = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
      for j, name in enumerate(sublayers):
        attention(f"{hf}.{j}.{name}", path + (f"layer_{j}", name), i == 0 and j == 0)
      j = len(sublayers)
      for w in (("wi_0", "wi_1") if gated else ("wi",)):
        out[f"{hf}.{j}.DenseReluDense.{w}.weight"] = (
            path + (f"layer_{j}", "DenseReluDense", w, "kernel"), (f, d), "linear")
      out[f"{hf}.{j}.DenseReluDense.wo.weight"] = (
          path + (f"layer_{j}", "DenseReluDense", "wo", "kernel"), (d, f), "linear")
      for k in range(j + 1):
        out[f"{hf}.{k}.layer_norm.weight"] = (path + (f"layer_{k}", "layer_norm", "scale"),
                                             (d,), "same")
    out[f"{stack}.final_layer_norm.weight"] = ((stack, "final_layer_norm", "scale"), (d,), "same")
  if _writes_lm_head(cfg) if with_lm_head is None else with_lm_head:
    out["lm_head.weight"] = (("lm_head", "kernel"), (v, d), "linear")
  return out


def _to_recjax(x: np.ndarray, kind: str, cfg: T5Config) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "linear":
    return x.T
  if kind == "qkv":
    return x.T.reshape(cfg.d_model, cfg.num_heads, cfg.d_kv)
  return x.T.reshape(cfg.num_heads, cfg.d_kv, cfg.d_model)  # "o"


def _to_hf(x: np.ndarray, kind: str, cfg: T5Config) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "linear":
    return x.T
  if kind == "qkv":
    return x.reshape(cfg.d_model, cfg.num_heads * cfg.d_kv).T
  return x.reshape(cfg.num_heads * cfg.d_kv, cfg.d_model).T  # "o"


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _lm_head_tied(state: Mapping[str, np.ndarray], tie: bool) -> bool:
  """transformers 5.x rule: an absent lm_head follows the config, a present one is tied
  iff it equals the input embedding."""
  if "lm_head.weight" not in state:
    return tie
  shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
  head = state["lm_head.weight"]
  return shared is not None and head.shape == shared.shape and np.array_equal(head, shared)


def params_from_hf(state: Mapping[str, np.ndarray], cfg: T5Config,
                   dtype: Any = None) -> dict[str, Any]:
  """Checks a HF state dict against `cfg` and converts it to a recjax tree (numpy arrays
  in `dtype`, default `cfg.param_dtype`; scanned if `cfg.scan_layers`).

  Raises:
    ValueError listing every missing, unexpected and mis-shaped tensor.
  """
  state = dict(state)
  if "shared.weight" not in state:  # Some exports keep only a stack's copy.
    for name in _EMBED_DUPLICATES:
      if name in state:
        state["shared.weight"] = state[name]
        break
  problems = []
  for name in _EMBED_DUPLICATES:
    if name in state:
      dup = state.pop(name)
      shared = state.get("shared.weight")
      if shared is not None and (dup.shape != shared.shape or not np.array_equal(dup, shared)):
        problems.append(f"  {name} differs from shared.weight (separate input embeddings "
                        "per stack are not supported)")
  for name in _IGNORED:
    state.pop(name, None)
  if cfg.tie_word_embeddings and "lm_head.weight" in state and _lm_head_tied(state, True):
    state.pop("lm_head.weight")
  layout = hf_layout(cfg, with_lm_head=not cfg.tie_word_embeddings)
  missing = sorted(set(layout) - set(state))
  unexpected = sorted(set(state) - set(layout))
  wrong = sorted(n for n in set(layout) & set(state) if tuple(state[n].shape) != layout[n][1])
  problems += [f"  missing: {n} (expected shape {layout[n][1]})" for n in missing]
  problems += [f"  unexpected: {n} (shape {tuple(state[n].shape)})" for n in unexpected]
  problems += [f"  mis-shaped: {n} expected {layout[n][1]}, got {tuple(state[n].shape)}"
               for n in wrong]
  if problems:
    raise ValueError("checkpoint does not match the T5 config:\n" + "\n".join(problems))
  dtype = cfg.param_dtype if dtype is None else dtype
  params: dict[str, Any] = {}
  for name, (path, _, kind) in layout.items():
    x = np.asarray(state[name])
    _set(params, path, np.ascontiguousarray(_to_recjax(x, kind, cfg).astype(dtype)))
  return scan_params(params, cfg) if cfg.scan_layers else params


def params_to_hf(params: Mapping[str, Any], cfg: T5Config,
                 dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """recjax tree -> HF state dict (numpy, contiguous)."""
  if cfg.scan_layers:
    params = unscan_params(params, cfg)
  state = {}
  for name, (path, shape, kind) in hf_layout(cfg).items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      x = np.asarray(_get(params, ("shared", "embedding"))).T  # tied but unscaled: a copy
    else:
      x = np.asarray(_get(params, path))
    x = _to_hf(x, kind, cfg)
    assert x.shape == shape, (name, x.shape, shape)
    state[name] = np.ascontiguousarray(x.astype(dtype))
  return state


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except TypeError:  # bfloat16, which numpy does not know: read the file by hand.
    with open(path, "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
      if name != "__metadata__":
        start, end = info["data_offsets"]
        dt = _SAFETENSORS_DTYPES[info["dtype"]]
        out[name] = np.asarray(data[start:end]).view(dt).reshape(info["shape"])
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  import torch  # Only for legacy pytorch_model.bin checkpoints.
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_hf_state(directory: str) -> dict[str, np.ndarray]:
  """Tensors of a local HF model directory: safetensors (sharded or not) when present,
  without PyTorch; otherwise pytorch_model.bin (sharded or not), read with torch."""
  for name, reader in (("model.safetensors.index.json", _read_safetensors),
                       ("model.safetensors", _read_safetensors),
                       ("pytorch_model.bin.index.json", _read_torch),
                       ("pytorch_model.bin", _read_torch)):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    if not name.endswith(".index.json"):
      return reader(path)
    with open(path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in files:
      state.update(reader(os.path.join(directory, shard)))
    return state
  raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) "
                          f"in {directory}")


def _looks_like_hub_id(path: str) -> bool:
  """'t5-small' or 'google/flan-t5-small'; not an absolute, relative or home path."""
  return (bool(path) and not path.startswith(("/", ".", "~")) and path.count("/") <= 1
          and "\\" not in path and not os.path.exists(path))


def _resolve(path: str) -> str:
  """A local model directory as is; a hub id downloaded with huggingface_hub (network)."""
  if os.path.isdir(path):
    return path
  if not _looks_like_hub_id(path):
    raise FileNotFoundError(f"{path}: no such model directory (a hub id looks like "
                            "'google/flan-t5-small')")
  from huggingface_hub import snapshot_download  # Hub ids only, needs the network.
  try:
    directory = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
  except Exception as e:  # offline, unknown repository, or a mistyped relative path
    raise FileNotFoundError(f"{path}: no such model directory, and fetching it as a hub "
                            f"id failed ({type(e).__name__}: {e})") from e
  if not any(os.path.exists(os.path.join(directory, name))
             for name in ("model.safetensors", "model.safetensors.index.json")):
    # An older repository with PyTorch weights only (read with torch).
    directory = snapshot_download(path, allow_patterns=["*.json", "pytorch_model*.bin"])
  return directory


def load_t5_from_hf(path: str, **config_overrides) -> tuple[T5, dict[str, Any]]:
  """Loads a HF T5 / FLAN-T5 checkpoint.

  Args:
    path: a local directory (config.json + model.safetensors, sharded safetensors with
      model.safetensors.index.json, or pytorch_model.bin, sharded or not; safetensors are
      preferred and need no PyTorch) or a hub id such as "google/flan-t5-base" (downloaded
      with huggingface_hub when the network allows: json and safetensors files, or the
      pytorch_model*.bin files of a repository without safetensors).
    **config_overrides: T5Config fields to change: `param_dtype` (dtype of the returned
      parameters, default float32), `dtype` (activations), `dropout_rate`, `scan_layers`,
      `remat_policy`... Architecture fields come from config.json.
  Returns:
    (T5 module, params) with params a nested dict of numpy arrays in
    `module.config.param_dtype`; use `module.apply({"params": params}, ...)`.
  Raises:
    ValueError listing missing, unexpected and mis-shaped tensors.
    FileNotFoundError for a path that is neither a model directory nor a hub id.
  """
  directory = _resolve(path)
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  state = read_hf_state(directory)
  tie = bool(hf.get("tie_word_embeddings", True))
  cfg = config_from_hf(hf, lm_head_tied=_lm_head_tied(state, tie), **config_overrides)
  return T5(cfg), params_from_hf(state, cfg, cfg.param_dtype)


def save_t5_to_hf(module: T5 | T5Config, params: Mapping[str, Any], path: str, *,
                  dtype: Any = np.float32) -> None:
  """Writes config.json + model.safetensors (tensors in `dtype`, e.g. np.float32 or
  ml_dtypes.bfloat16) that `transformers.T5ForConditionalGeneration.from_pretrained(path)`
  loads. Accepts scanned or unscanned params (numpy or jax arrays)."""
  from safetensors.numpy import save_file
  cfg = module if isinstance(module, T5Config) else module.config
  os.makedirs(path, exist_ok=True)
  state = params_to_hf(params, cfg, dtype)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, dtype), f, indent=2, sort_keys=True)
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

"""Experiment config files: `experiments/*.py`, each defining `get_config()`."""

from __future__ import annotations

from collections.abc import Mapping
import importlib.util
from typing import Any

import ml_collections


def load_config_file(path: str, overrides: Mapping[str, Any] | None = None
                     ) -> ml_collections.ConfigDict:
  """The ConfigDict of `get_config()` in the Python file at `path`.

  overrides: {dotted key: value} (e.g. {"train.num_epochs": 20}) set after locking the
  config, so a mistyped key is an error instead of a silently added field.
  """
  spec = importlib.util.spec_from_file_location("recjax_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} cannot be loaded")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if overrides:
    config.lock()
    config.update_from_flattened_dict(dict(overrides))
  return config

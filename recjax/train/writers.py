"""Metric writers: a JSONL log and TensorBoard scalars, from process 0 only.

The workdir may be local or a URL (`gs://bucket/run`). Object stores have no
append, so for a URL the JSONL file is rewritten whole on every `write` (a
few kB: rows are written every `log_every_steps`); TensorBoard event files
go to `gs://` through tensorboardX (needs `google-cloud-storage`).
"""

from __future__ import annotations

import json
import os
import sys
import time

from etils import epath
import jax
import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def is_url(path: str) -> bool:
  """True for `gs://...` and other URLs (anything with a scheme)."""
  return "://" in str(path)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch, when it is installed, only to accept torch tensors as
  values (~2 s of start-up here); recjax writes floats. Unless torch is already loaded,
  the import runs with torch hidden, and torch stays importable afterwards.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None              # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:                      # a tensorboardX that needs torch: let it have it
    sys.modules.pop("torch", None)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """`write(step, {"train/loss": ...})` -> `<workdir>/metrics.jsonl` and TB."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    self._remote_rows: list[str] | None = None
    if not self.enabled:
      return
    workdir = str(workdir)
    if is_url(workdir):
      self._path = epath.Path(workdir) / "metrics.jsonl"
      self._path.parent.mkdir(parents=True, exist_ok=True)
      self._remote_rows = (self._path.read_text().splitlines(keepends=True)
                           if self._path.exists() else [])
    else:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    line = json.dumps(row) + "\n"
    if self._remote_rows is not None:
      self._remote_rows.append(line)
      self._path.write_text("".join(self._remote_rows))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()

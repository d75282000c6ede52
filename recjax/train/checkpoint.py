"""Orbax checkpoints: the latest state for resuming, the best params for eval.

Layout under the workdir:
  checkpoints/<step>/{state, meta}   the full train state (params, optimizer
                                     state, step) and the loop's bookkeeping
                                     (best metric, patience, timers) as JSON;
                                     the last `max_to_keep` are kept.
  best/<step>/{params, meta}         the parameters with the best validation
                                     metric so far (one kept).
Restores go into abstract targets carrying the *current* mesh's shardings, so
a checkpoint written on one mesh restores onto another (another mesh shape,
another number of devices or processes).

The workdir may be a local path or a URL that `etils.epath` understands
(`gs://bucket/run` on Cloud TPU VMs); with several processes every process
calls every method (Orbax coordinates them; process 0 writes the metadata).
With `async_save`, `save` returns once the arrays are copied off the devices
and the files are written in the background; `wait()` (or `close()`) blocks
until every pending save is on disk.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath
import orbax.checkpoint as ocp


def resolve_dir(path: str) -> str:
  """Local paths made absolute (`~` expanded); URLs (`gs://...`) unchanged."""
  if "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


class Checkpointer:
  """The two Orbax managers of a workdir (see the module docstring)."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2,
               async_save: bool = False):
    workdir = epath.Path(resolve_dir(workdir))
    self.async_save = async_save
    options = lambda keep: ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        workdir / "checkpoints", options=options(max_to_keep),
        item_names=("state", "meta"))
    self.best = ocp.CheckpointManager(
        workdir / "best", options=options(1),
        item_names=("params", "meta"))

  # The latest train state -------------------------------------------------
  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict]:
    step = self.latest.latest_step() if step is None else step
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  # The best parameters ----------------------------------------------------
  def best_step(self) -> int | None:
    return self.best.latest_step()

  def save_best(self, step: int, params: Any, meta: dict) -> None:
    """Keeps `params` as the best so far. A run that died after saving the best at `step`
    but before its latest checkpoint replays that step on restart and arrives here again
    with the same parameters: the existing step is kept (Orbax refuses to overwrite)."""
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)),
                   force=True)

  def restore_best(self, abstract_params: Any) -> tuple[Any, dict]:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint under {self.best.directory}")
    out = self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        meta=ocp.args.JsonRestore()))
    return out["params"], out["meta"]

  def wait(self) -> None:
    """Blocks until every pending (async) save is complete."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.latest.close()
    self.best.close()

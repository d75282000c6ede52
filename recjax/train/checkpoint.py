"""Orbax checkpoints: the latest state for resuming, the best params for eval.

Layout under the workdir:
  checkpoints/<step>/{state, meta}   the full train state (params, optimizer
                                     state, step) and the loop's bookkeeping
                                     (best metric, patience, timers) as JSON;
                                     the last `max_to_keep` are kept.
  best/<step>/{params, meta}         the parameters with the best validation
                                     metric so far (one kept).
Restores go into abstract targets carrying the *current* mesh's shardings, so
a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 2,
               async_save: bool = False):
    workdir = os.path.abspath(os.path.expanduser(workdir))
    options = lambda keep: ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=options(max_to_keep),
        item_names=("state", "meta"))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"), options=options(1),
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
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

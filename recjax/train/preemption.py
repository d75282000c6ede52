"""Preemption: SIGTERM -> save a checkpoint at the current step -> clean exit.

Cloud schedulers (preemptible / spot TPU VMs, Kubernetes, Slurm) send SIGTERM
some seconds before they kill a job. `PreemptionGuard` turns that signal into a
stop request that the training loop polls once per step:

  with preemption.PreemptionGuard() as guard:
    for step, batch in ...:
      state = train_step(state, batch)
      if guard.should_stop(step + 1):
        save_checkpoint(step + 1)
        break

Every process must stop at the same step, or the collectives of the next
step (and Orbax's save barriers) would hang. How they agree depends on the
runtime:

  one process, no jax.distributed   a Python SIGTERM handler sets a flag; the
                                    check is a Python bool (no overhead);
  jax.distributed with its          JAX's runtime catches SIGTERM itself and
  preemption service (the default)  propagates the notice to all processes;
                                    `multihost_utils.reached_preemption_sync_point`
                                    returns True on every process at the same
                                    step (a local check, no per-step collective);
  several processes, preemption     a Python handler per process and a
  service disabled                  `process_allgather` of the flags every step.

`request_stop()` asks for a stop without a signal (tests, a joint loop's own
conditions). On exit the previous signal handlers are restored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class PreemptionGuard:
  """Polls for a preemption notice once per step; a context manager.

  Attributes:
    mode: "local" (one process), "sync_point" (JAX's preemption service) or
      "allgather" (several processes without it).
    stop_step: the step at which `should_stop` first returned True, else None.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._signalled = False    # set by our handler (this process only)
    self._requested = False    # set by request_stop()
    self._previous: dict[int, object] = {}
    self.stop_step: int | None = None
    if (jax.distributed.is_initialized()
        and jax.config.jax_enable_preemption_service):
      self.mode = "sync_point"
    elif jax.process_count() > 1:
      self.mode = "allgather"
    else:
      self.mode = "local"

  # Signal handling ----------------------------------------------------------
  def __enter__(self) -> PreemptionGuard:
    if self.mode == "sync_point":
      # JAX's runtime owns SIGTERM: a Python handler would replace its notifier.
      logging.info("preemption: JAX's preemption service handles SIGTERM")
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard entered outside the main thread: "
                      "signals are not handled")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handler(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self._signalled:
      logging.warning("%s again: already stopping", name)
      return
    logging.warning("%s received: saving a checkpoint and stopping", name)
    print(f"{name} received: stopping after the current step to save a "
          "checkpoint", flush=True)
    self._signalled = True

  def request_stop(self) -> None:
    """Asks for a stop at the next check, as a signal would.

    With several processes, call it on every process before the same step
    (e.g. from a condition they all compute): it is not communicated.
    """
    self._requested = True

  # The per-step check -------------------------------------------------------
  def should_stop(self, step: int) -> bool:
    """True when every process should save at `step` and stop.

    Must be called by every process at every step with the same `step`: in
    the multi-process modes it is a synchronisation point.
    """
    if self.stop_step is not None:
      return True
    if self.mode == "local":
      stop = self._signalled or self._requested
    elif self.mode == "sync_point":
      stop = (multihost_utils.reached_preemption_sync_point(step)
              or self._requested)
    else:
      flags = multihost_utils.process_allgather(np.asarray(self._signalled))
      stop = bool(np.any(flags)) or self._requested
    if stop:
      self.stop_step = step
    return stop

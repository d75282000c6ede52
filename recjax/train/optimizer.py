"""Optimizers and learning-rate schedules from the config (`config.optim`).

Keys of `config.optim`:
  name              "adamw" (default) or "adafactor" (T5's usual optimizer: factored second
                    moments, so its state is ~O(rows + cols) per matrix instead of 2x the
                    parameters; the memory choice for FLAN-T5-XL/XXL).
  lr                peak learning rate (both optimizers; the schedule below drives it).
  schedule          "constant" (default), "cosine" or "linear" decay after the warm-up.
  warmup_steps      linear warm-up from 0 to `lr` (default 0).
  final_lr_fraction the decay's end value as a fraction of `lr` (default 0).
  grad_clip         > 0: clip the global gradient norm to this value first (default 0 = off).
  adamw only:       b1, b2, eps, weight_decay (decoupled).
  adafactor only (optional; defaults are optax's / t5x's):
    weight_decay            decoupled decay rate (default 0 = off; `weight_decay_rate`).
    adafactor_momentum      first-moment decay, e.g. 0.9 (default None: no momentum, the
                            t5x default, which keeps the state factored and small).
    adafactor_decay_rate    second-moment decay exponent (default 0.8).
    adafactor_clipping      Adafactor's own update-RMS clipping threshold (default 1.0).
    adafactor_param_scale   multiply the step by the parameter RMS (default True; the lr is
                            then a relative step size).
    adafactor_min_dim_to_factor  factor the second moment of dims >= this (default 128).
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("adamw", "adafactor")


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `cfg.lr`, then constant, cosine or linear decay."""
  warmup = int(cfg.get("warmup_steps", 0))
  decay_steps = max(num_steps - warmup, 1)
  kind = cfg.get("schedule", "constant")
  if kind == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps,
                                        alpha=cfg.get("final_lr_fraction", 0.0))
  elif kind == "linear":
    after = optax.linear_schedule(
        cfg.lr, cfg.lr * cfg.get("final_lr_fraction", 0.0), decay_steps)
  else:
    raise ValueError(f"optim.schedule: unknown {kind!r} "
                     "(constant, cosine, linear)")
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _adafactor(cfg, schedule) -> optax.GradientTransformation:
  decay = cfg.get("weight_decay", 0.0)
  return optax.adafactor(
      schedule,
      min_dim_size_to_factor=int(cfg.get("adafactor_min_dim_to_factor", 128)),
      decay_rate=cfg.get("adafactor_decay_rate", 0.8),
      multiply_by_parameter_scale=bool(cfg.get("adafactor_param_scale", True)),
      clipping_threshold=cfg.get("adafactor_clipping", 1.0),
      momentum=cfg.get("adafactor_momentum", None),
      weight_decay_rate=decay if decay else None)


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """`cfg.name` ("adamw" | "adafactor") on `make_schedule`, optionally after
  global-norm clipping (`cfg.grad_clip > 0`); see the module docstring for the keys."""
  name = cfg.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name: unknown {name!r} {OPTIMIZERS}")
  parts = []
  if cfg.get("grad_clip", 0.0) > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  schedule = make_schedule(cfg, num_steps)
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
  else:
    parts.append(_adafactor(cfg, schedule))
  return optax.chain(*parts)

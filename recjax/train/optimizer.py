"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import optax


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


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW (optionally with global-norm clipping) on `make_schedule`."""
  name = cfg.get("name", "adamw")
  if name != "adamw":
    raise ValueError(f"optim.name: unknown {name!r} (adamw)")
  parts = []
  if cfg.get("grad_clip", 0.0) > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)

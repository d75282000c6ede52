"""Training schedules as data: stages of loss weights and trainable towers.

A stage never changes the compiled step: `controls(stage)` yields the same pytree structure
and dtypes for every stage (see `joint_task.stage_controls`). `data` names the subset the
loop should feed in that stage (the loop decides what the names mean).

CoReLLa (Xi et al., arXiv 2403.16378), three stages:
  S1 CRM alone on all data (b=1); S2 joint on a small random subset (a=b=1, g=0.1, the
  layer-wise alignment); S3 LLM alone on another subset (a=1). The LLM side of the bridge
  (`LLM_SIDE_BRIDGE`: its item head, soft prompts, the memory's LLM view) trains with the LLM
  in S3; the parts that build the CRM's item embeddings stay frozen with the CRM.
DELRec (arXiv 2406.11156), two stages:
  S1 distil the CRM into the soft prompts: CRM and T5 frozen, the LLM side of the bridge
  (soft prompts, item head) trained on the next item (L_llm) and on the teacher's
  distribution (L_kl with the CRM side stop-gradient); the teacher, including the bridge
  parts that feed it (item memory, its CRM view, title fusion), stays fixed;
  S2 soft prompts (bridge) and CRM frozen, T5 tuned on L_llm.
  (The paper's dynamic gradient-norm weighting of its two stage-1 tasks and its LoRA
  adapters are not implemented: fixed weights, full T5 fine-tuning.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax

from recjax.train.joint_task import stage_controls, trainable_mask


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  fraction: float                      # share of the total training steps
  weights: Mapping[str, float]         # {"crm", "llm", "kl", "layer"}; missing = 0
  # {tower or path pattern: flag}, the last matching pattern wins, unmatched = frozen
  # (`joint_task.trainable_mask`), e.g. {"llm": True, "llm/lm_head": False}.
  trainable: Mapping[str, bool]
  data: str = "all"                    # which data subset the loop feeds


# The bridge parts on the LLM's side only: soft prompts, the item head, item tokens and the
# memory's LLM view. The rest of the bridge (the item memory itself, its CRM view, the title
# fusion) builds the CRM's item embeddings, so a stage that keeps the CRM frozen keeps them
# frozen too. (With title fusion the CRM also reads T5's title encodings, which still move
# where T5 trains.) A regular expression, so that the optional parts may be absent.
LLM_SIDE_BRIDGE = r"bridge/(crm_to_llm|llm_head|item_tokens|memory/to_llm|memory/user_memory)(/.*)?"

# T5's token head: no loss term reaches it (the item head is the bridge's), so where T5
# trains it is frozen, or weight decay alone would shrink a pretrained head that title
# generation (`JointTask.generate`) reads. Optional: a tied T5 has none.
NO_TOKEN_HEAD = {"?llm/lm_head": False}

SCHEDULES: dict[str, tuple[Stage, ...]] = {
    "corella": (
        Stage("s1_crm", 0.4, {"crm": 1.0},
              {"crm": True}, data="all"),
        Stage("s2_joint", 0.3, {"crm": 1.0, "llm": 1.0, "layer": 0.1},
              {"crm": True, "llm": True, "bridge": True, **NO_TOKEN_HEAD}, data="subset_a"),
        Stage("s3_llm", 0.3, {"llm": 1.0},
              {"llm": True, LLM_SIDE_BRIDGE: True, **NO_TOKEN_HEAD}, data="subset_b"),
    ),
    "delrec": (
        Stage("s1_distil", 0.5, {"llm": 1.0, "kl": 1.0},
              {LLM_SIDE_BRIDGE: True}),
        Stage("s2_tune", 0.5, {"llm": 1.0},
              {"llm": True, **NO_TOKEN_HEAD}),
    ),
    # Everything at once (the BDLM-style joint objective).
    "joint": (
        Stage("joint", 1.0, {"crm": 1.0, "llm": 1.0, "kl": 0.1, "layer": 0.1},
              {"crm": True, "llm": True, "bridge": True, **NO_TOKEN_HEAD}),
    ),
}


def get_schedule(name_or_stages: str | Sequence[Stage]) -> tuple[Stage, ...]:
  if isinstance(name_or_stages, str):
    if name_or_stages not in SCHEDULES:
      raise ValueError(f"unknown schedule {name_or_stages!r}; known {sorted(SCHEDULES)}")
    return SCHEDULES[name_or_stages]
  return tuple(name_or_stages)


def stage_boundaries(stages: Sequence[Stage], num_steps: int) -> list[int]:
  """First step of each stage (the last stage runs to `num_steps`)."""
  total = sum(s.fraction for s in stages)
  starts, acc = [], 0.0
  for s in stages:
    starts.append(int(round(acc / total * num_steps)))
    acc += s.fraction
  return starts


def tower_steps(stages: Sequence[Stage], num_steps: int, params) -> dict[str, int]:
  """How many steps each tower trains for over the run ({tower: steps}; 0 for one that
  never trains). A tower's optimizer step count only advances while it trains, so its
  learning-rate schedule must span these steps, not the run's (`make_joint_optimizer`).

  params: the parameter tree or its shapes (`jax.eval_shape` of the init).
  """
  starts = stage_boundaries(stages, num_steps) + [num_steps]
  out = {}
  for i, stage in enumerate(stages):
    mask = trainable_mask(dict(stage.trainable), params)
    for tower, flags in mask.items():
      trains = any(bool(f) for f in jax.tree.leaves(flags))
      out[tower] = out.get(tower, 0) + (max(starts[i + 1] - starts[i], 0) if trains else 0)
  return out


def stage_at(stages: Sequence[Stage], step: int, num_steps: int) -> Stage:
  starts = stage_boundaries(stages, num_steps)
  index = max(i for i, start in enumerate(starts) if start <= step)
  return stages[index]


def controls(stage: Stage, params, catalogue: dict | None = None) -> dict:
  """The step's controls for a stage (same structure and dtypes for every stage).

  params: the parameter tree (or its shapes): the trainable flags are per parameter.
  """
  return stage_controls(dict(stage.weights), dict(stage.trainable), params, catalogue)

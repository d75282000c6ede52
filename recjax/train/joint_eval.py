"""Evaluation of the joint model: CRM, LLM and routed full-ranking metrics, and reports.

`JointEvaluator` scores every valid or test user with both heads and ranks the held-out
item against the whole catalogue (`recjax.routing.routing_curve`: CRM alone, LLM alone and
CRM-entropy routing at each fraction). The rest formats what the joint loop prints and
saves (`recjax.train.joint_loop`).
"""

from __future__ import annotations

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from recjax import evaluation
from recjax import metrics as metrics_lib
from recjax import routing
from recjax import sharding as shd
from recjax.train.joint_task import JointTask

HEADS = ("crm", "llm")


class JointEvaluator:
  """CRM, LLM and routed full-ranking metrics on the valid or test users."""

  def __init__(self, task: JointTask, data, builder, mesh, *, batch_size: int,
               exclude_history: bool, ks=(5, 10, 20), compiler_options=None):
    self.task, self.mesh, self.batch_size = task, mesh, batch_size
    self.ks, self.exclude_history = tuple(ks), exclude_history
    self.examples, self.seen = {}, {}
    for split in ("valid", "test"):
      hist, target, _ = data.eval_examples(split, task.cfg.crm.max_len)
      batch = {"inputs": hist, **builder(hist),
               "user_ids": np.arange(1, len(hist) + 1, dtype=np.int32)}
      self.examples[split] = (batch, target)
      self.seen[split] = data.seen_items(split)
    self.num_items = data.num_items
    shards = shd.num_batch_shards(mesh)
    if batch_size % shards:
      raise ValueError(f"eval.batch_size={batch_size} not divisible by {shards} data shards")
    self._scores = jax.jit(task.scores, out_shardings=shd.replicated(mesh),
                           compiler_options=compiler_options)

  def protocol(self, split: str) -> evaluation.Protocol:
    return evaluation.Protocol(split=split, candidates="full",
                               exclude_history=self.exclude_history, ks=self.ks,
                               num_items=self.num_items)

  def scores(self, params, catalogue, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(crm, llm) float32[U, N + 1] for every user of the split."""
    batch, _ = self.examples[split]
    num = len(batch["inputs"])
    sharding = shd.batch_sharding(self.mesh)
    crm, llm = [], []
    for start in range(0, num, self.batch_size):
      stop = min(start + self.batch_size, num)
      rows = {k: np.pad(v[start:stop], [(0, self.batch_size - (stop - start))] +
                        [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
      rows = jax.device_put(rows, sharding)
      c, l = self._scores(params, rows, catalogue)
      crm.append(c[:stop - start])
      llm.append(l[:stop - start])
    crm, llm = jax.device_get((crm, llm))
    return np.concatenate(crm), np.concatenate(llm)

  def run(self, params, catalogue, split: str, fractions=(0.0, 1.0)) -> dict:
    """{"crm": metrics, "llm": metrics, "routing": [per-fraction metrics]}."""
    crm, llm = self.scores(params, catalogue, split)
    batch, target = self.examples[split]
    # Every item seen before the target, not only the model's max_len window.
    exclude = self.seen[split].mask(crm.shape[1]) if self.exclude_history else None
    check_no_nan_scores(split, {"crm": crm, "llm": llm}, target, exclude)
    fractions = sorted(set(fractions) | {0.0, 1.0})
    curve = routing.routing_curve(jnp.asarray(crm), jnp.asarray(llm), jnp.asarray(target),
                                  fractions, self.ks,
                                  None if exclude is None else jnp.asarray(exclude))
    by_fraction = {row["llm_fraction"]: row for row in curve}
    strip = lambda row: {k: v for k, v in row.items() if k not in ("llm_fraction", "routed")}
    return {"crm": {**strip(by_fraction[0.0]), "num_examples": len(target)},
            "llm": {**strip(by_fraction[1.0]), "num_examples": len(target)},
            "routing": curve}


def format_coverage(cov: dict, config) -> str:
  """One line of `PromptBuilder.coverage`."""
  return (f"{cov['mean_items_shown']:.2f} of up to {config.prompt.num_items} recent items "
          f"shown on average ({cov['items_dropped']:,} of {cov['items_offered']:,} offered "
          f"items dropped past prompt_len={config.prompt.prompt_len}, in "
          f"{cov['rows_with_drops']:,} of {cov['rows']:,} prompts); {cov['titles_cut']:,} "
          f"catalogue titles cut at title_len={config.prompt.title_len}")


def check_no_nan_scores(split: str, heads: dict[str, np.ndarray], target: np.ndarray,
                        exclude: np.ndarray | None) -> None:
  """Raises FloatingPointError if a head's scores float32[U, N + 1] hold a NaN where the
  ranking of `target` int32[U] reads them (as `RankingEvaluator`'s default nan_policy): a
  diverged head is an error, not a quietly bad number that could pick the "best"
  checkpoint."""
  for head, scores in heads.items():
    nan = metrics_lib.nan_rows(jnp.asarray(scores), jnp.asarray(target),
                               None if exclude is None else jnp.asarray(exclude))
    if num := int(jnp.sum(nan)):
      raise FloatingPointError(f"{split}: {num} of {len(target)} users have NaN {head} "
                               "scores among the ranked items")


def monitor_value(results: dict, monitor: str) -> float:
  """"crm/ndcg@10" -> results["crm"]["ndcg@10"]."""
  head, _, metric = monitor.partition("/")
  if head not in HEADS or metric not in results[head]:
    raise ValueError(f"train.monitor: {monitor!r} is not <crm|llm>/<metric>")
  return float(results[head][metric])


def format_routing(curve: list[dict], ks) -> str:
  cols = [f"ndcg@{k}" for k in ks] + [f"hr@{k}" for k in ks]
  lines = ["llm fraction | routed | " + " | ".join(cols)]
  for row in curve:
    lines.append(f"{row['llm_fraction']:>12.2f} | {row['routed']:>6d} | " +
                 " | ".join(f"{row[c]:.4f}" for c in cols))
  return "\n".join(lines)


def save_routing_plot(curve: list[dict], path: str, title: str, metric: str = "ndcg@10"
                      ) -> bool:
  """`metric` (a key of the curve's rows) against the LLM fraction as a PNG (False when
  matplotlib is missing)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r["llm_fraction"] for r in curve], [r[metric] for r in curve], "o-")
  ax.set_xlabel("fraction of users routed to the LLM (most uncertain CRM first)")
  ax.set_ylabel(f"test {metric.upper()} (full ranking)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)
  return True

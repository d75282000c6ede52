r"""Joint model on MovieLens-100K over seeds, plus one ablation per bridge direction.

Runs experiments/joint_ml100k.py (through `recjax.train.joint_loop`) for every requested
(variant, seed) in sequence, one workdir each (a finished run is read back, not re-run, so
the script can be stopped and restarted), and writes a markdown table and a JSON summary:
test NDCG@10 / HR@10 of the joint model's CRM head, its LLM head, and the routed model at
each LLM fraction, mean +- std over seeds.

Variants:
  full           every bridge direction on (the config as is: llm_grad_to_crm=False);
  unshielded     full with bridge.llm_grad_to_crm = True;
  no_crm_to_llm  bridge.crm_to_llm = False (no soft prompts from the SASRec user state);
  no_item_tokens bridge.item_tokens = False and prompt.item_repr = "title" (titles only);
  no_llm_to_crm  bridge.llm_to_crm = False (no T5 title knowledge in SASRec's items);
  shield_crm     bridge.llm_grad_to_crm = False (the LLM head, item tokens and soft prompts
                 read SASRec and the shared item memory through a stop-gradient: the LLM
                 item loss and the KL do not reach SASRec).
SASRec alone is experiments/sasrec_ml100k.py (`experiments/bench_sasrec_ml100k.py`).

Run (CPU; each run ~10-15 minutes on a quiet 2-core machine):
  python experiments/bench_joint_ml100k.py --seeds=0,1,2 --variants=full \
      --out=/tmp/recjax/bench_joint_ml100k
  python experiments/bench_joint_ml100k.py --seeds=0 \
      --variants=no_crm_to_llm,no_item_tokens,no_llm_to_crm --out=/tmp/recjax/bench_joint_ml100k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recjax import allocator  # noqa: E402

if __name__ == "__main__":  # before any work: may re-run this command under tcmalloc
  allocator.reexec_from_argv()

VARIANTS = {
    "full": {},
    "no_crm_to_llm": {"bridge.crm_to_llm": False},
    "no_item_tokens": {"bridge.item_tokens": False, "prompt.item_repr": "title"},
    "no_llm_to_crm": {"bridge.llm_to_crm": False},
    # The config's default is the shielded model; "unshielded" lets the LLM losses train
    # SASRec (what the first "full" run measured).
    "shield_crm": {"bridge.llm_grad_to_crm": False},
    "unshielded": {"bridge.llm_grad_to_crm": True},
}


def summarize(runs: dict) -> tuple[str, dict]:
  """{variant: [results]} -> (markdown table, JSON summary)."""
  def stat(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

  lines = ["| variant | seeds | head | test NDCG@10 | test HR@10 |", "|---|---|---|---|---|"]
  summary = {}
  for variant, results in runs.items():
    if not results:
      continue
    summary[variant] = {}
    heads = [("CRM", lambda m: m["crm"]), ("LLM", lambda m: m["llm"])]
    for row in results[0]["metrics"]["test"]["routing"]:
      f = row["llm_fraction"]
      if 0.0 < f < 1.0:
        heads.append((f"routed {f:.0%}", lambda m, f=f: next(
            r for r in m["routing"] if r["llm_fraction"] == f)))
    for name, get in heads:
      ndcg = stat([get(r["metrics"]["test"])["ndcg@10"] for r in results])
      hr = stat([get(r["metrics"]["test"])["hr@10"] for r in results])
      summary[variant][name] = {"ndcg@10": ndcg, "hr@10": hr}
      lines.append(f"| {variant} | {len(results)} | {name} | {ndcg[0]:.4f} +- {ndcg[1]:.4f} "
                   f"| {hr[0]:.4f} +- {hr[1]:.4f} |")
    summary[variant]["train_seconds"] = [r["train_seconds"] for r in results]
  return "\n".join(lines), summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--allocator", default="auto", help=allocator.HELP)
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "joint_ml100k.py"))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default="full")
  parser.add_argument("--out", default="/tmp/recjax/bench_joint_ml100k")
  args = parser.parse_args()
  from recjax.configs import load_config_file  # pylint: disable=g-import-not-at-top
  from recjax.train import joint_loop  # pylint: disable=g-import-not-at-top
  runs = {}
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      parser.error(f"unknown variant {variant!r}; known {sorted(VARIANTS)}")
    runs[variant] = []
    for seed in (int(s) for s in args.seeds.split(",")):
      workdir = os.path.join(args.out, f"{variant}_seed{seed}")
      path = os.path.join(workdir, "results.json")
      if not os.path.exists(path):
        config = load_config_file(args.config, {"seed": seed, **VARIANTS[variant]})
        joint_loop.train_and_evaluate_joint(config, workdir)
      with open(path) as f:
        runs[variant].append(json.load(f))
  table, summary = summarize(runs)
  print(table)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(f"wrote {args.out}/summary.json and table.md")


if __name__ == "__main__":
  main()

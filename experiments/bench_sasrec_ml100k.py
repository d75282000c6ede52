r"""Quality and speed benchmark: SASRec on MovieLens-100K over several seeds.

Command (2-core CPU, ~3 x the single-run time; see README for figures):
  python experiments/bench_sasrec_ml100k.py --seeds=0,1,2 \
      --out=/tmp/recjax/bench_sasrec_ml100k

Each seed trains `experiments/sasrec_ml100k.py` from scratch in
`<out>/seed<k>` (deleted first) and tests the best-validation checkpoint.
Reported per seed and as mean +- std over seeds:
  * test NDCG@10 / HR@10 (full ranking, history not excluded) against
    RecBole 1.2.1's SASRec on this data and split: 0.0636 / 0.1326;
  * the best validation NDCG@10 and the step where it was reached;
  * time to validation NDCG@10 >= 0.0742 (RecBole's best, ~1,750 s of training
    on a 2-core CPU): `train_s` counts train steps only (compilation
    included, evaluation excluded), `wall_s` everything since the process
    started training (data loading, compilation, evaluations, checkpoints).
Writes `<out>/summary.json` and `<out>/summary.md`.
"""

import ast
import json
import os
import shutil
import time

from recjax import allocator  # noqa: E402

if __name__ == "__main__":  # before any work: may re-run this command under tcmalloc
  allocator.reexec_from_argv()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

from recjax import configs  # noqa: E402
from recjax.train import loop  # noqa: E402

allocator.define_absl_flag()

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_OUT = flags.DEFINE_string("out", "/tmp/recjax/bench_sasrec_ml100k", "")
_CONFIG = flags.DEFINE_string(
    "config", os.path.join(os.path.dirname(__file__), "sasrec_ml100k.py"),
    "Config file (get_config()).")
_SET = flags.DEFINE_multi_string(
    "set", [], "Config overrides key=value (python literal), e.g. "
    "--set=input.stride=5")

RECBOLE = {"test_ndcg@10": 0.0636, "test_hr@10": 0.1326,
           "best_valid_ndcg@10": 0.0742, "train_s_to_target": 1750.0}


def _load_config(path, overrides):
  parsed = {}
  for item in overrides:
    key, value = item.split("=", 1)
    try:
      parsed[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed[key] = value                      # a plain string
  return configs.load_config_file(path, parsed)   # locked: an unknown key is an error


def _row(seed, res):
  test, valid = res["metrics"]["test/full"], res["metrics"]["valid/full"]
  target = res["target_reached"] or {}
  return {
      "seed": seed,
      "test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"],
      # Standard error over the test users of this one run (absent in old results).
      "test_ndcg@10_se_users": test.get("ndcg@10_se"),
      "valid_ndcg@10_at_best": valid["ndcg@10"],
      "best_step": res["best_step"], "steps": res["steps"],
      "epochs": res["epochs"],
      "train_s_to_target": target.get("train_seconds"),
      "wall_s_to_target": target.get("wall_seconds"),
      "epoch_at_target": target.get("epoch"),
      "train_s": res["train_seconds"], "wall_s": res["wall_seconds"],
      "allocator": res.get("allocator"),
  }


def _summary(rows):
  out = {}
  for key in rows[0]:
    if key in ("seed", "allocator"):
      continue
    vals = [r[key] for r in rows if r[key] is not None]
    if vals:
      # std: population (np.std), as the README reports; sem: the standard error
      # of the mean over seeds (sample std / sqrt(n)).
      out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                  "sem": (float(np.std(vals, ddof=1) / np.sqrt(len(vals)))
                          if len(vals) > 1 else None),
                  "min": float(np.min(vals)), "max": float(np.max(vals)),
                  "n": len(vals)}
  return out


def _markdown(rows, summary, config_path, overrides):
  lines = [f"config: `{config_path}` {' '.join(overrides)}", "",
           "| seed | test NDCG@10 | test HR@10 | valid NDCG@10 (best ckpt) | "
           "best step | train s to valid NDCG@10>=0.0742 | wall s to it | "
           "train s total |",
           "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f="{:.4f}": "not reached" if v is None else f.format(v)
  for r in rows:
    lines.append(
        f"| {r['seed']} | {fmt(r['test_ndcg@10'])} | {fmt(r['test_hr@10'])} | "
        f"{fmt(r['valid_ndcg@10_at_best'])} | {r['best_step']} | "
        f"{fmt(r['train_s_to_target'], '{:.1f}')} | "
        f"{fmt(r['wall_s_to_target'], '{:.1f}')} | {r['train_s']:.1f} |")
  ms = lambda k: (f"{summary[k]['mean']:.4f} +- {summary[k]['std']:.4f}"
                  if k in summary else "n/a")
  lines += ["", f"mean +- std over {len(rows)} seeds: test NDCG@10 "
            f"{ms('test_ndcg@10')}, test HR@10 {ms('test_hr@10')}; "
            f"RecBole 1.2.1: {RECBOLE['test_ndcg@10']} / "
            f"{RECBOLE['test_hr@10']}."]
  sem = summary.get("test_ndcg@10", {}).get("sem")
  users = summary.get("test_ndcg@10_se_users", {}).get("mean")
  if sem is not None or users is not None:
    lines.append("standard error of test NDCG@10: "
                 + (f"of the mean over seeds {sem:.4f}" if sem is not None else "")
                 + ("; " if sem is not None and users is not None else "")
                 + (f"of one run over its test users {users:.4f}"
                    if users is not None else "") + ".")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  for seed in map(int, _SEEDS.value):
    config = _load_config(_CONFIG.value, _SET.value)
    config.seed = seed
    workdir = os.path.join(_OUT.value, f"seed{seed}")
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    res = loop.train_and_evaluate(config, workdir)
    row = _row(seed, res)
    row["process_s"] = time.perf_counter() - t0
    rows.append(row)
    print(json.dumps(row), flush=True)
  summary = _summary(rows)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "summary.json"), "w") as f:
    json.dump({"rows": rows, "summary": summary, "recbole": RECBOLE,
               "overrides": _SET.value}, f, indent=2)
  md = _markdown(rows, summary, _CONFIG.value, _SET.value)
  with open(os.path.join(_OUT.value, "summary.md"), "w") as f:
    f.write(md + "\n")
  print(md)


if __name__ == "__main__":
  app.run(main)

r"""The peer: RecBole 1.2.1's SASRec on MovieLens-100K, one seed per call.

Reproduces the reference run in ANCHORS / the issue's quality bar (2 blocks,
2 heads, hidden 64, inner 256, dropout 0.5, CE over the whole catalogue, Adam
1e-3, batch 256, 20 epochs, leave-one-out by time, full ranking, history
window 50, best-validation checkpoint tested) so that its spread over seeds
can be measured beside recjax's. RecBole is NOT a recjax dependency: run this
in its own virtual environment (RecBole 1.2.1 pins `ray<=2.6.3`, which only
its hyper-parameter search imports, so it is installed without dependencies):

  python3 -m venv /tmp/rbenv && . /tmp/rbenv/bin/activate
  pip install torch==2.13.0 "numpy<2" scipy "pandas<2.3" tqdm colorlog==4.7.2 \
      colorama==0.4.4 scikit-learn pyyaml tensorboard thop tabulate plotly \
      texttable psutil
  pip install --no-deps recbole==1.2.1
  python experiments/recbole_sasrec_ml100k.py --seed=2020 --out=/tmp/rb/s2020

Hardware: 2 CPU cores. Time: 77 s per epoch in ANCHORS; 100-110 s per
epoch and 2,187-2,221 s of fitting for 20 epochs in session 8 (AMD EPYC VM,
nothing else running). Do not run other CPU jobs beside it: PyTorch's two
threads then thrash (one contended epoch took 735 s). Expected result: seed 2020 (RecBole's
default) is the issue's reference run, test NDCG@10 0.0636 / HR@10 0.1326;
figures for other seeds are in the README ("RecBole's own seeds").

Two things RecBole 1.2.1 does that this script undoes, both outside the
model: importing its sequential models switches on PyTorch's autograd anomaly
detection for the whole process (~2x slower; ANCHORS' figures were taken with
it off), and its `torch.load` of the best checkpoint predates PyTorch 2.6's
`weights_only=True` default (the checkpoint is our own file, so it is loaded
with `weights_only=False`). The data are the complete MovieLens-100K atomic
files that the RecBole wheel carries (943 users, 1,682 items, 100,000
ratings; the same files recjax falls back to), with no filtering.
Writes `<out>/result.json`: best validation and test metrics, fit seconds,
and the validation NDCG@10 of every epoch. `--split_only` writes RecBole's
leave-one-out split instead (`<out>/split.json`), for
`experiments/compare_split_recbole.py`.
"""

import argparse
import json
import os
import re
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=2020)
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--out", required=True)
  parser.add_argument("--split_only", action="store_true",
                      help="write <out>/split.json (RecBole's validation and "
                      "test targets and histories per user) and stop; "
                      "experiments/compare_split_recbole.py reads it")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

  import torch  # pylint: disable=g-import-not-at-top
  import recbole  # pylint: disable=g-import-not-at-top
  from recbole.config import Config  # pylint: disable=g-import-not-at-top
  from recbole.data import create_dataset, data_preparation  # pylint: disable=g-import-not-at-top
  from recbole.model.sequential_recommender.sasrec import SASRec  # pylint: disable=g-import-not-at-top
  from recbole.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from recbole.utils import init_logger, init_seed  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  config = Config(model="SASRec", dataset="ml-100k", config_dict=dict(
      data_path=os.path.join(os.path.dirname(recbole.__file__),
                             "dataset_example"),
      checkpoint_dir=os.path.join(args.out, "saved"),
      epochs=args.epochs, train_batch_size=256, eval_batch_size=2048,
      learner="adam", learning_rate=1e-3, weight_decay=0.0,
      loss_type="CE", train_neg_sample_args=None,
      eval_args={"split": {"LS": "valid_and_test"}, "order": "TO",
                 "mode": "full", "group_by": "user"},
      metrics=["Recall", "MRR", "NDCG", "Hit"], topk=[10],
      valid_metric="NDCG@10", MAX_ITEM_LIST_LENGTH=50, n_layers=2, n_heads=2,
      hidden_size=64, inner_size=256, hidden_dropout_prob=0.5,
      attn_dropout_prob=0.5, hidden_act="gelu", layer_norm_eps=1e-12,
      initializer_range=0.02, device="cpu", use_gpu=False, seed=args.seed,
      reproducibility=True, stopping_step=10, eval_step=1,
      show_progress=False, log_wandb=False))
  init_seed(config["seed"], config["reproducibility"])
  init_logger(config)
  dataset = create_dataset(config)
  print(dataset, flush=True)
  train, valid, test = data_preparation(config, dataset)
  if args.split_only:
    _write_split(dataset, valid, test, os.path.join(args.out, "split.json"))
    return
  init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
  model = SASRec(config, train._dataset).to(config["device"])  # pylint: disable=protected-access
  torch.autograd.set_detect_anomaly(False)  # RecBole's SINE import set it
  trainer = Trainer(config, model)
  start = time.time()
  _, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
  fit_s = time.time() - start
  test_result = trainer.evaluate(test, load_best_model=True,
                                 show_progress=False)
  result = {"seed": args.seed, "epochs": args.epochs,
            "best_valid": {k: float(v) for k, v in best_valid.items()},
            "test": {k: float(v) for k, v in test_result.items()},
            "fit_s": fit_s, "valid_ndcg@10_per_epoch": _epoch_scores()}
  print(json.dumps(result, indent=1), flush=True)
  with open(os.path.join(args.out, "result.json"), "w") as f:
    json.dump(result, f, indent=1)


def _write_split(dataset, valid, test, path: str) -> None:
  """{"valid"|"test": {raw user: [raw target, [raw history, oldest first]]}}."""
  split = {}
  for name, loader in (("valid", valid), ("test", test)):
    feat = loader._dataset.inter_feat  # pylint: disable=protected-access
    users = dataset.id2token("user_id", feat["user_id"].numpy())
    targets = dataset.id2token("item_id", feat["item_id"].numpy())
    lengths = feat["item_length"].numpy()
    histories = feat["item_id_list"].numpy()
    split[name] = {
        str(u): [str(t), [str(x) for x in dataset.id2token(
            "item_id", histories[k, :lengths[k]])]]
        for k, (u, t) in enumerate(zip(users, targets))}
  with open(path, "w") as f:
    json.dump(split, f)
  print(f"wrote {path}: " + ", ".join(f"{k} {len(v)} users"
                                     for k, v in split.items()), flush=True)


def _epoch_scores() -> list[float]:
  """Validation scores of every epoch, read back from RecBole's log file."""
  import logging  # pylint: disable=g-import-not-at-top
  for handler in logging.getLogger().handlers:
    path = getattr(handler, "baseFilename", None)
    if path and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return [float(m) for m in re.findall(r"valid_score: ([0-9.]+)",
                                             f.read())]
  return []


if __name__ == "__main__":
  main()

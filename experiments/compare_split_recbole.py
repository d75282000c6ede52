r"""Compares recjax's leave-one-out split of ML-100K with RecBole 1.2.1's.

RecBole's ML-100K preset min-max scales the timestamp column into float32
(`normalize_all: True`) before its stable sort by time, so timestamps about a
second apart become ties kept in file order; recjax sorts the integer
timestamps (`data.time_order="exact"`, the default) unless told to sort on
RecBole's key (`data.time_order="recbole"`). This script counts, per user,
where the two splits differ: validation and test targets and the (up to 50)
history items before each.

Command (the first line in RecBole's own environment, see
experiments/recbole_sasrec_ml100k.py; the second in recjax's):
  python experiments/recbole_sasrec_ml100k.py --split_only --out=/tmp/rbsplit
  python experiments/compare_split_recbole.py --recbole_split=/tmp/rbsplit/split.json

Hardware: any CPU, seconds. Expected result (measured, session 9): exact
order: 4 test targets, 5 validation targets, 37 test histories and 38
validation histories of 943 users differ; recbole order: none differs.
"""

import json

from absl import app
from absl import flags

from recjax.configs import load_config_file
from recjax.train import loop

_SPLIT = flags.DEFINE_string("recbole_split", None, "split.json written by "
                             "recbole_sasrec_ml100k.py --split_only",
                             required=True)
_CONFIG = flags.DEFINE_string("config", "experiments/sasrec_ml100k.py",
                              "config file whose `data` block is used")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "history items compared")


def compare(data, split: dict, max_len: int) -> dict[str, int]:
  """Counts of users whose target / history differ, per time order."""
  counts = {"users": data.num_users, "users_missing_in_recbole": 0,
            "valid_targets": 0, "test_targets": 0, "valid_histories": 0,
            "test_histories": 0}
  for u in range(data.num_users):
    seq = [str(data.item_raw_ids[i]) for i in data.sequence(u)]
    user = str(data.user_raw_ids[u])
    if user not in split["test"] or user not in split["valid"]:
      counts["users_missing_in_recbole"] += 1
      continue
    for name, cut in (("valid", 2), ("test", 1)):
      target, history = split[name][user]
      counts[f"{name}_targets"] += seq[-cut] != target
      counts[f"{name}_histories"] += seq[:-cut][-max_len:] != history
  return counts


def main(argv):
  del argv
  with open(_SPLIT.value, encoding="utf-8") as f:
    split = json.load(f)
  for order in ("exact", "recbole"):
    config = load_config_file(_CONFIG.value, {"data.time_order": order})
    counts = compare(loop.load_data(config.data), split, _MAX_LEN.value)
    users = counts.pop("users")
    print(f"time_order={order}: {users} users; differing: " + ", ".join(
        f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
  app.run(main)

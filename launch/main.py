r"""recjax launcher: parses flags, sets up the runtime, calls the trainer.

  python launch/main.py --config experiments/sasrec_ml100k.py \
      --workdir /tmp/recjax/sasrec_ml100k [--mode train|eval] \
      [--config.train.num_epochs=5 ...]

Multi-host (Cloud TPU VM, multi-GPU hosts): add --jax_distributed; on TPU VMs
`jax.distributed.initialize()` finds its peers itself, elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from recjax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file (experiments/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes automatically) or eval (best ckpt).")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (not on TPU VMs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax is chatty at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if _MODE.value == "train":
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    loop.evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

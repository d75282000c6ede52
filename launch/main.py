r"""recjax launcher: parses flags, sets up the runtime, calls the trainer.

A config with an `llm` section (experiments/joint_ml100k.py) runs the joint loop
(`recjax.train.joint_loop`), any other the SASRec loop (`recjax.train.loop`).

  python launch/main.py --config experiments/sasrec_ml100k.py \
      --workdir /tmp/recjax/sasrec_ml100k [--mode train|eval] \
      [--config.train.num_epochs=5 ...]

Memory plan of one train step, from shapes only (nothing allocated; see recjax/plan.py):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/main.py \
      --config experiments/joint_flan_t5_plan.py:flan-t5-xl --workdir /tmp/recjax/plan \
      --mode=plan --plan_mesh=1,8,1 --plan_batch=256 [--plan_out=plan.json]

Runs re-execute themselves once with tcmalloc preloaded when it is installed, on every
platform (`--allocator`, recjax/allocator.py; `--allocator=system` opts out).

Multi-host (Cloud TPU VM, multi-GPU hosts): add --jax_distributed; on TPU VMs
`jax.distributed.initialize()` finds its peers itself, elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""

from recjax import allocator

if __name__ == "__main__":  # Before any work: may re-run this command under tcmalloc.
  allocator.reexec_from_argv()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from recjax.train import joint_loop
from recjax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file (experiments/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "plan"],
                          "train (resumes automatically), eval (best ckpt), or plan "
                          "(memory/FLOPs of one step from shapes; recjax/plan.py).")
_PLAN_MESH = flags.DEFINE_string(
    "plan_mesh", None, "--mode=plan: (data, fsdp, tensor) sizes, e.g. '8,1,1' or '2,4,1'; "
    "default config.mesh.shape. Simulate devices with XLA_FLAGS="
    "--xla_force_host_platform_device_count=N.")
_PLAN_BATCH = flags.DEFINE_integer(
    "plan_batch", None, "--mode=plan: global batch size; default config.train.batch_size "
    "or config.input.batch_size.")
_PLAN_OUT = flags.DEFINE_string("plan_out", None, "--mode=plan: write the report as JSON.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (not on TPU VMs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "")
allocator.define_absl_flag()
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
  logging.info("process %d of %d, %d local / %d global devices, allocator %s",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), allocator.loaded())
  config = _CONFIG.value
  joint = "llm" in config        # SASRec + T5 + bridge (recjax.train.joint_loop)
  if _MODE.value == "plan":
    _plan(config)
  elif _MODE.value == "train":
    if joint:
      joint_loop.train_and_evaluate_joint(config, _WORKDIR.value)
    else:
      loop.train_and_evaluate(config, _WORKDIR.value)
  elif joint:
    joint_loop.evaluate_joint(config, _WORKDIR.value)
  else:
    loop.evaluate(config, _WORKDIR.value)


def _plan(config):
  """--mode=plan: compile the step for --plan_mesh from shapes, print, write JSON."""
  import json
  import os
  from recjax import plan as plan_lib
  mesh = (tuple(int(x) for x in _PLAN_MESH.value.split(","))
          if _PLAN_MESH.value else tuple(config.mesh.shape))
  batch = _PLAN_BATCH.value
  if batch is None:
    section = config.train if "batch_size" in config.get("train", {}) else config.input
    batch = int(section.batch_size)
  report = plan_lib.plan(config, mesh, batch)
  print(plan_lib.format_plan(report), flush=True)
  if _PLAN_OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_PLAN_OUT.value)), exist_ok=True)
    with open(_PLAN_OUT.value, "w") as f:
      json.dump(plan_lib.to_jsonable(report), f, indent=2)
    print(f"wrote {_PLAN_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)

#!/usr/bin/env bash
# Cloud TPU VM: create a (multi-host) TPU slice, copy this repository to every
# worker, install it, train on all workers at once, delete the slice.
#
# Every worker runs `launch/main.py --jax_distributed`; on TPU VMs
# `jax.distributed.initialize()` finds its peers itself. The workdir must be a
# gs:// path that every worker can reach: Orbax writes one checkpoint from all
# workers together, process 0 writes metrics.jsonl, TensorBoard events and
# results.json. Preemption (spot/preemptible slices): the job saves a
# checkpoint at the step all workers agree on and exits; `run` again resumes.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/tpu_vm.sh COMMAND [launch/main.py flags...]

commands:
  create   gcloud compute tpus tpu-vm create (SPOT=1 for a spot slice)
  setup    copy this repository to every worker and install it there (uv, a
           Python 3.11 venv in REMOTE_DIR/.venv)
  run      train on all workers: launch/main.py --jax_distributed
           --config=\$CONFIG --workdir=\$WORKDIR [flags...] (also resumes)
  ssh      open a shell on worker 0
  delete   delete the TPU VM

environment:
  TPU_NAME          the TPU VM's name (required)
  ZONE              e.g. us-central2-b (required)
  PROJECT           gcloud project (default: gcloud's configured one)
  ACCELERATOR_TYPE  e.g. v4-16 (2 hosts), v5litepod-16 (default: v4-8)
  RUNTIME_VERSION   TPU software version (default: tpu-ubuntu2204-base)
  SPOT=1            create a spot slice
  CONFIG            the config file, relative to the repository root
  WORKDIR           gs://bucket/path for checkpoints, logs, results (run)
  REMOTE_DIR        where the repository goes on the workers (default: recjax)
  PYTHON_VERSION    the workers' Python, installed with uv into REMOTE_DIR/.venv
                    (default: 3.11; the TPU images' own Python 3.10 is too old)

example (a v4-16 slice, 2 hosts x 4 chips):
  export TPU_NAME=recjax ZONE=us-central2-b ACCELERATOR_TYPE=v4-16
  launch/tpu_vm.sh create && launch/tpu_vm.sh setup
  CONFIG=experiments/sasrec_ml100k.py WORKDIR=gs://my-bucket/recjax/ml100k \\
      launch/tpu_vm.sh run --config.mesh.shape='(-1,1,1)'
  launch/tpu_vm.sh delete
USAGE
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 2
fi
command="$1"
shift

: "${TPU_NAME:?set TPU_NAME (see launch/tpu_vm.sh --help)}"
: "${ZONE:?set ZONE (see launch/tpu_vm.sh --help)}"
accelerator="${ACCELERATOR_TYPE:-v4-8}"
runtime="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
remote_dir="${REMOTE_DIR:-recjax}"
python_version="${PYTHON_VERSION:-3.11}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_flags=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi

# Runs a shell command on every worker of the slice at once.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" \
      --worker=all --command="$1"
}

case "$command" in
  create)
    extra=()
    if [[ "${SPOT:-0}" == 1 ]]; then
      extra+=(--spot)
    fi
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}" \
        --accelerator-type="$accelerator" --version="$runtime" "${extra[@]}"
    ;;
  setup)
    archive="$(mktemp -t recjax.XXXXXX.tar.gz)"
    trap 'rm -f "$archive"' EXIT
    tar -C "$root" -czf "$archive" --exclude=.git --exclude=.venv \
        --exclude='*.egg-info' --exclude=__pycache__ .
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:recjax.tar.gz" \
        "${gcloud_flags[@]}" --worker=all
    # The TPU images ship Python 3.10 (Ubuntu 22.04), which jax 0.10 and recjax
    # (>= 3.11) do not support: uv installs Python 3.11 into a venv on every worker.
    # jax[tpu] brings libtpu; gcsfs + google-cloud-storage let etils.epath
    # (Orbax, our writers) and tensorboardX write to gs://; [hf] brings
    # sentencepiece/transformers (the joint configs' tokenizer and checkpoints).
    on_all_workers "set -e; rm -rf ~/$remote_dir; mkdir -p ~/$remote_dir; \
tar -xzf ~/recjax.tar.gz -C ~/$remote_dir; \
python3 -m pip install --user --upgrade uv; \
~/.local/bin/uv venv --python $python_version ~/$remote_dir/.venv; \
~/.local/bin/uv pip install --python ~/$remote_dir/.venv/bin/python \
    'jax[tpu]>=0.10.2,<0.11' gcsfs google-cloud-storage -e ~/$remote_dir'[hf]'; \
~/$remote_dir/.venv/bin/python -c 'import jax; print(jax.devices())'"
    ;;
  run)
    : "${CONFIG:?set CONFIG, e.g. experiments/sasrec_ml100k.py}"
    : "${WORKDIR:?set WORKDIR to a gs:// path}"
    if [[ "$WORKDIR" != gs://* ]]; then
      echo "error: WORKDIR must be a gs:// path every worker can reach," \
           "got $WORKDIR" >&2
      exit 2
    fi
    flags=""
    for flag in "$@"; do
      flags+=" $(printf '%q' "$flag")"
    done
    on_all_workers "cd ~/$remote_dir && .venv/bin/python launch/main.py \
--jax_distributed --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR")$flags"
    ;;
  ssh)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=0
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_flags[@]}" --quiet
    ;;
  *)
    echo "error: unknown command $command" >&2
    usage >&2
    exit 2
    ;;
esac

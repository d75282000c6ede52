#!/usr/bin/env bash
# Trains (or evaluates) a recjax config on one NVIDIA GPU.
#
# INSTALL=1 first installs JAX with its CUDA 12 wheels (`jax[cuda12]`, which
# bring their own CUDA and cuDNN: only the NVIDIA driver is needed) and this
# package into the current Python environment.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/gpu.sh CONFIG WORKDIR [launch/main.py flags...]

  CONFIG    an experiments/*.py config file
  WORKDIR   checkpoints, metrics.jsonl, results.json (resumes if present)
  flags     passed on, e.g. --mode=eval --config.train.num_epochs=2

environment:
  INSTALL=1          pip install "jax[cuda12]" (0.10.x) and this package first
  GPU=N              which GPU to use (CUDA_VISIBLE_DEVICES, default: 0)
  MEM_FRACTION=F     XLA_PYTHON_CLIENT_MEM_FRACTION (default: JAX's 0.75)
  PYTHON=...         the interpreter (default: python3)

example:
  INSTALL=1 launch/gpu.sh experiments/sasrec_ml100k.py /tmp/recjax/ml100k_gpu
USAGE
}

if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 2
fi
config="$1"
workdir="$2"
shift 2
python="${PYTHON:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ ! -f "$config" ]]; then
  echo "error: config file not found: $config" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: nvidia-smi not found: no NVIDIA driver on this machine" >&2
  exit 1
fi

if [[ "${INSTALL:-0}" == 1 ]]; then
  "$python" -m pip install "jax[cuda12]>=0.10.2,<0.11"   # as pyproject.toml
  "$python" -m pip install -e "$root[hf]"   # [hf]: the joint configs' tokenizer
fi

export CUDA_VISIBLE_DEVICES="${GPU:-0}"
export JAX_PLATFORMS=cuda
if [[ -n "${MEM_FRACTION:-}" ]]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
fi
"$python" -c 'import jax; d = jax.devices(); print("devices:", d); assert d[0].platform == "gpu", d'
exec "$python" "$root/launch/main.py" "--config=$config" "--workdir=$workdir" "$@"

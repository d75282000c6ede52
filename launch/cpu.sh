#!/usr/bin/env bash
# Trains (or evaluates) a recjax config on this machine's CPU.
#
# Optional simulated devices (to try a mesh, e.g. data=4 x fsdp=2) and optional
# simulated hosts: PROCESSES=P starts P local processes joined by
# jax.distributed over 127.0.0.1 (cross-process collectives over gloo), each
# with DEVICES devices, exactly as P hosts of a multi-host job would run.
set -euo pipefail

usage() {
  cat <<USAGE
usage: launch/cpu.sh CONFIG WORKDIR [launch/main.py flags...]

  CONFIG    an experiments/*.py config file
  WORKDIR   checkpoints, metrics.jsonl, results.json (resumes if present)
  flags     passed on, e.g. --mode=eval --config.train.num_epochs=2

environment:
  DEVICES=N     simulated CPU devices per process (default: 1)
  PROCESSES=P   local processes joined by jax.distributed (default: 1)
  PORT=N        coordinator port for PROCESSES > 1 (default: 12355)
  PYTHON=...    the interpreter (default: python3)

examples:
  launch/cpu.sh experiments/sasrec_ml100k.py /tmp/recjax/ml100k
  DEVICES=8 launch/cpu.sh experiments/sasrec_ml100k.py /tmp/recjax/mesh \\
      --config.mesh.shape='(4,2,1)' --config.mesh.rules=fsdp
  PROCESSES=2 DEVICES=4 launch/cpu.sh experiments/sasrec_ml100k.py /tmp/recjax/mh
USAGE
}

if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 2
fi
config="$1"
workdir="$2"
shift 2
devices="${DEVICES:-1}"
processes="${PROCESSES:-1}"
port="${PORT:-12355}"
python="${PYTHON:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ ! -f "$config" ]]; then
  echo "error: config file not found: $config" >&2
  exit 2
fi
if ! [[ "$devices" =~ ^[1-9][0-9]*$ && "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DEVICES and PROCESSES must be positive integers" >&2
  exit 2
fi

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
cmd=("$python" "$root/launch/main.py" "--config=$config" "--workdir=$workdir")

if [[ "$processes" == 1 ]]; then
  exec "${cmd[@]}" "$@"
fi

# Several local processes: start them all, wait for all, fail if any fails.
# SIGTERM / Ctrl-C are forwarded as SIGTERM: every process saves a checkpoint
# at the same step and exits (run the same command again to resume).
pids=()
forward() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap forward INT TERM
for ((i = 0; i < processes; i++)); do
  "${cmd[@]}" --jax_distributed --coordinator_address="127.0.0.1:${port}" \
      --num_processes="$processes" --process_id="$i" "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (> 128) when a trapped signal arrives: wait again.
  while true; do
    rc=0
    wait "$pid" || rc=$?
    if ((rc <= 128)) || ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
  done
  ((rc == 0)) || status=$rc
done
exit "$status"

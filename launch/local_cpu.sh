#!/usr/bin/env bash
# Multi-process pretraining on one machine's CPU: NUM_PROCESSES processes with
# DEVICES_PER_PROCESS simulated devices each, joined by jax.distributed over localhost
# (collectives over gloo). The same code path as a multi-host pod, for trying it out.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_cpu.sh configs/demo.py /tmp/mae_mp \
#     --config.total_steps=200
#
# Process 0 prints to the terminal, the others to WORKDIR/../<name>.process<i>.log.
# config.batch_size must be divisible by NUM_PROCESSES * DEVICES_PER_PROCESS.
# Ctrl-C or SIGTERM to this script is passed on as SIGTERM: the processes agree on a step,
# save it and exit 75, which this script returns (rerun it to resume). Otherwise its
# status is the first non-zero one of the processes.
# PYTHON picks the interpreter (default: `python` on PATH), e.g. PYTHON=.venv/bin/python.
set -euo pipefail
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
PORT="${PORT:-23456}"
PYTHON="${PYTHON:-python}"
CONFIG="${1:-configs/demo.py}"
WORKDIR="${2:-/tmp/mae_multiprocess}"
shift 2 || shift $#

cd "$(dirname "$0")/.."
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = NUM_PROCESSES - 1; i >= 0; i--)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
       "$PYTHON" -m mae_jax.main --config="$CONFIG" --workdir="$WORKDIR" --multihost
       --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$i" "$@")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "$WORKDIR.process$i.log" 2>&1 &
  fi
  pids+=($!)
done
status_of() {  # the exit status of process $1, waiting on through trapped signals
  local rc
  while :; do
    wait "$1" && rc=0 || rc=$?
    kill -0 "$1" 2>/dev/null || return "$rc"
  done
}
status=0
for pid in "${pids[@]}"; do
  status_of "$pid" && rc=0 || rc=$?
  if ((status == 0)); then status=$rc; fi
done
exit "$status"

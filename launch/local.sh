#!/usr/bin/env bash
# Runs one jtrain run as N processes on this machine, the way N hosts would run it: to try a
# multi-host setup (sharding, data per process, preemption) on one box, CPU included.
#
#   launch/local.sh 2 --config=configs/tiny.py --workdir=runs/two_processes
#
# Each process sees JAX_NUM_CPU_DEVICES CPU devices (default 2) unless JAX_PLATFORMS names an
# accelerator; PYTHON picks the interpreter (default: python). SIGTERM/SIGINT to this script go to every process, which then agree on one
# step, save it and exit; re-running the same command resumes there.
set -uo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=configs/NAME.py --workdir=DIR [flags...]" >&2
  exit 2
fi
n=$1
shift
export JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-2}
port=${JTRAIN_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  "${PYTHON:-python}" -m jtrain.main "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process is gone.
  while true; do
    wait "$pid"
    code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  ((code != 0)) && status=$code
done
exit "$status"

#!/usr/bin/env bash
# Sets up and runs jtrain on every worker of a Cloud TPU pod slice (v4/v5e/v5p/v6e), or of
# several slices joined over the data-centre network (multislice).
#
#   launch/tpu_pod.sh setup TPUS ZONE [GIT_URL@REVISION]   # code + venv on every worker
#   launch/tpu_pod.sh run   TPUS ZONE configs/NAME.py WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh logs  TPUS ZONE [WORKER|all]          # follow a worker's log (default 0)
#   launch/tpu_pod.sh stop  TPUS ZONE                       # save and stop; `run` resumes
#   DRY_RUN=1 launch/tpu_pod.sh ...                         # print the commands instead
#
# TPUS is one TPU VM's name; several names separated by commas (slices created one by one,
# e.g. `tpu-a,tpu-b`), which this script joins as one multislice run; or `qr:NAME`, a queued
# resource (made with `gcloud compute tpus queued-resources create NAME --node-count=N ...`),
# whose slices Cloud TPU joins itself.
#
# setup copies this checkout's files (tracked and untracked, not ignored ones) to ~/jtrain on
# every worker, or clones GIT_URL there at REVISION, and installs it with `pip install -e
# ".[tpu]"` (jax[tpu], libtpu) into ~/jtrain-venv, a venv that uv (installed when missing)
# makes with Python $PYTHON_VERSION (default 3.12; TPU images' own python3 may be older than
# the 3.11 jax needs). Run it again after changing the code: the venv is kept.
#
# run starts `python -m jtrain.main --distributed` detached on every worker (setsid nohup), so
# closing the terminal does not stop it; each worker appends to its own ~/jtrain-logs/jtrain.log
# and writes the process id to ~/jtrain-logs/jtrain.pid. Before that it refuses to start over a
# jtrain run still going on a worker (stop it first), then clears what a crashed run leaves
# behind, as MaxText's scripts do: processes still holding the TPU (/dev/accel*, /dev/vfio/*)
# are killed and /tmp/libtpu_lockfile removed. With several TPU names, each worker gets the
# MEGASCALE_* variables (coordinator = worker 0 of the first slice, MEGASCALE_PORT, default
# 8081) and, unless a --config.mesh.dcn_* flag is given, --config.mesh.dcn_data=<slices>
# (data parallel across slices); a queued resource's workers get MEGASCALE_* from Cloud TPU,
# so pass the mesh.dcn_* flags yourself.
#
# The workdir must be a filesystem every worker shares (a Filestore/NFS mount or a
# gcsfuse-mounted bucket), not a local disk. stop (or a maintenance event's SIGTERM) makes
# every host save the same step and exit 0; `run` again resumes there.
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '5,9p' "$0" | sed 's/^#//' >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action=$1 tpus=$2 zone=$3
shift 3
# shellcheck disable=SC2016 # expanded on the workers
code='$HOME/jtrain' venv='$HOME/jtrain-venv' logdir='$HOME/jtrain-logs'
megascale_port=${MEGASCALE_PORT:-8081}
python_version=${PYTHON_VERSION:-3.12}

# Prints a command as a line a shell can run again (DRY_RUN=1), or runs it.
show() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then show "$@"; else "$@"; fi
}

if [[ $tpus == qr:* ]]; then
  names=("${tpus#qr:}")
  api=(queued-resources) all=(--node=all --worker=all)
else
  IFS=, read -ra names <<<"$tpus"
  api=(tpu-vm) all=(--worker=all)
fi
[[ ${#names[@]} -ge 1 && -n ${names[0]} ]] || usage

# A worker's jtrain process is alive (checked by its command line: a pid file left by a run
# before a reboot may name another process by now).
running="test -f $logdir/jtrain.pid && grep -qs jtrain.main /proc/\$(cat $logdir/jtrain.pid)/cmdline"

# on_workers NAME SCRIPT [gcloud flags]: runs SCRIPT on the workers the flags name.
on_workers() {
  local name=$1 script=$2
  shift 2
  run gcloud compute tpus "${api[@]}" ssh "$name" --zone="$zone" "$@" --command="$script"
}

# The shell words of a remote command line, quoted for the remote shell.
quoted() { printf '%q ' "$@"; }

setup() {
  local fetch name
  if [[ $# -ge 1 ]]; then
    [[ $1 == *@?* ]] || { echo "error: give the code as GIT_URL@REVISION, not $1" >&2; exit 2; }
    fetch="rm -rf $code && git clone -q $(quoted "${1%@*}")$code && git -C $code checkout -q $(quoted "${1##*@}")"
  else
    local repo
    repo=$(cd "$(dirname "$0")/.." && pwd)
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      tarball=/tmp/jtrain-code.XXXXXX.tar.gz
      echo "# pack $repo's files that git does not ignore:"
      show tar -czf "$tarball" -C "$repo" '<git ls-files -co --exclude-standard>'
    else
      tarball=$(mktemp -t jtrain-code.XXXXXX.tar.gz) # global: the EXIT trap removes it
      trap 'rm -f "$tarball"' EXIT
      git -C "$repo" ls-files -z -co --exclude-standard |
        tar -C "$repo" --null -T - --ignore-failed-read -czf "$tarball"
    fi
    for name in "${names[@]}"; do
      run gcloud compute tpus "${api[@]}" scp "$tarball" "$name:jtrain-code.tar.gz" \
        --zone="$zone" "${all[@]}"
    done
    fetch="rm -rf $code && mkdir -p $code && tar -xzf \$HOME/jtrain-code.tar.gz -C $code && rm \$HOME/jtrain-code.tar.gz"
  fi
  # uv makes the venv with a Python jax supports (downloading it when the image's is older).
  local uv="\$HOME/.local/bin/uv"
  local get_uv="test -x $uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
  local new_venv="test -x $venv/bin/python || $uv venv -q --python $python_version $venv"
  local install="$fetch && { $get_uv; } && { $new_venv; } && $uv pip install -q --python $venv/bin/python -e \"${code}[tpu]\""
  for name in "${names[@]}"; do
    on_workers "$name" "$install" "${all[@]}"
  done
}

start() {
  [[ $# -ge 2 ]] || usage
  local config=$1 workdir=$2 slices=${#names[@]} flags=() address i env
  shift 2
  flags=("--config=$config" "--workdir=$workdir" "$@")
  if ((slices > 1)) && [[ " $* " != *" --config.mesh.dcn_"* ]]; then
    flags+=("--config.mesh.dcn_data=$slices")
  fi
  local busy="if $running; then echo \"error: jtrain is still running on \$(hostname): launch/tpu_pod.sh stop first\" >&2; exit 1; fi"
  local clean="pids=\$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); if test -n \"\$pids\"; then echo \"killing stale TPU users: \$pids\"; sudo kill -9 \$pids; for p in \$pids; do timeout 30 tail --pid=\$p -f /dev/null; done; fi; sudo rm -f /tmp/libtpu_lockfile"
  local launch
  launch="cd $code && mkdir -p $logdir && { setsid nohup $venv/bin/python -m jtrain.main --distributed $(quoted "${flags[@]}")>>$logdir/jtrain.log 2>&1 </dev/null & echo \$! >$logdir/jtrain.pid; }"
  if ((slices > 1)); then # the multislice coordinator: the first slice's worker 0
    local describe=(gcloud compute tpus tpu-vm describe "${names[0]}" --zone="$zone"
      '--format=value(networkEndpoints[0].ipAddress)')
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      show "${describe[@]}"
      address=COORDINATOR_IP
    else
      address=$("${describe[@]}")
      [[ -n $address ]] || { echo "error: no internal address for ${names[0]}'s worker 0" >&2; exit 1; }
    fi
  fi
  for i in "${!names[@]}"; do
    env=
    if ((slices > 1)); then
      env="export MEGASCALE_COORDINATOR_ADDRESS=$address:$megascale_port MEGASCALE_PORT=$megascale_port MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$i && "
    fi
    on_workers "${names[i]}" "$busy; $clean; $env$launch" "${all[@]}"
  done
  [[ ${DRY_RUN:-0} == 1 ]] || echo "started; follow worker 0 with: $0 logs $tpus $zone" >&2
}

stop() {
  local wait=${STOP_TIMEOUT:-600} name
  # Waits until the process is gone (the save done), for at most STOP_TIMEOUT seconds.
  local script="if $running && kill -TERM \$(cat $logdir/jtrain.pid); then end=\$((SECONDS + $wait)); while $running && ((SECONDS < end)); do sleep 0.2; done; else echo \"no jtrain running on \$(hostname)\"; fi"
  for name in "${names[@]}"; do
    on_workers "$name" "$script" "${all[@]}"
  done
}

logs() {
  local worker=${1:-0} where=(--worker="${1:-0}")
  [[ $tpus == qr:* ]] && where=(--node=0 "${where[@]}")
  if [[ $worker == all ]]; then
    on_workers "${names[0]}" "echo \"== \$(hostname)\"; tail -n 20 $logdir/jtrain.log" "${all[@]}"
  else
    on_workers "${names[0]}" "tail -n 100 -F $logdir/jtrain.log" "${where[@]}"
  fi
}

case $action in
  setup) setup "$@" ;;
  run) start "$@" ;;
  stop) stop ;;
  logs) logs "$@" ;;
  *) usage ;;
esac

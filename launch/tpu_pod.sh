#!/usr/bin/env bash
# A run on every host of a Cloud TPU pod slice (v4/v5e/v5p/v6e): the same command on all
# workers; JAX finds the other hosts itself (--distributed). jtrain must be installed on every
# worker (e.g. `pip install -e .` in a checkout there), and the workdir must be a filesystem
# all workers share (a Filestore/NFS mount or a gcsfuse-mounted bucket), not a local disk.
# A maintenance event's SIGTERM makes every host save the same step and exit 0; running this
# again resumes there.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/NAME.py /mnt/shared/runs/NAME [--config.x=y ...]
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE configs/NAME.py WORKDIR [flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/jtrain && python -m jtrain.main --distributed --config=$config --workdir=$workdir$extra"

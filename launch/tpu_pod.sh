#!/usr/bin/env bash
# Runs one ttt-jax command on every worker of a Cloud TPU pod slice (jax.distributed finds the
# other workers from the TPU metadata; see ttt_jax/distributed.py).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--setup] -- python launch/cluster_check.py \
#       --config=configs/default.py:preset=5b,seconds=9 --config.model.attention_backend=pallas_tpu
#
# --setup first copies this checkout to every worker (~/ttt-jax) and installs it with the tpu
# extra. Every worker must run the same command; their logs stream back prefixed by worker.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE [--setup] -- COMMAND..." >&2; exit 2
fi
TPU="$1"; ZONE="$2"; shift 2
SETUP=0
if [ "$1" = "--setup" ]; then SETUP=1; shift; fi
if [ "$1" != "--" ]; then echo "$0: expected -- before the command" >&2; exit 2; fi
shift
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
if [ "$SETUP" = 1 ]; then
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
    "$(cd "$(dirname "$0")/.." && pwd)" "$TPU":~/ttt-jax
  ssh_all 'cd ~/ttt-jax && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu]"'
fi
CMD="$(printf '%q ' "$@")"
ssh_all "cd ~/ttt-jax && source .venv/bin/activate && $CMD"

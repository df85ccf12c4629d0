#!/usr/bin/env bash
# Runs one btx_jax entry point on every host of a TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE btx_jax.train --config configs/llama2_7b.py --workdir gs://BUCKET/runs/seed
#
# Copies this checkout to every worker, sets up .venv there (Python >= 3.12, jax[tpu]) on the
# first run, then starts the same command on all hosts; jax.distributed.initialize() finds
# the other hosts by itself on TPU VMs. Preemption sends SIGTERM: the run saves a checkpoint,
# and re-running this script resumes from it.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE MODULE [ARGS...]   e.g. $0 my-v5p us-east5-a btx_jax.train --config ..." >&2
  exit 2
fi
tpu="$1"; zone="$2"; module="$3"; shift 3
dest="btx_jax"
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }

echo "[launch] copying $(pwd) to all workers of $tpu"
gcloud compute tpus tpu-vm scp --zone="$zone" --worker=all --recurse \
  $(git ls-files | sed 's|/.*||' | sort -u) "$tpu:$dest/"
ssh_all "cd $dest && bash scripts/make_venv.sh .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
printf -v args '%q ' "$@"
echo "[launch] running python -m $module $args on all workers"
ssh_all "cd $dest && BTX_DISTRIBUTED=1 .venv/bin/python -m $module $args"

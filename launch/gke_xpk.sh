#!/usr/bin/env bash
# Runs one btx_jax entry point as a GKE workload on TPU slices, with xpk (pip install xpk).
#
#   launch/gke_xpk.sh [OPTIONS] [--] MODULE [ARGS...]      (or: python -m MODULE ARGS...)
#   launch/gke_xpk.sh --project=P --zone=us-east5-a --cluster=my-cluster --name=btx-seed \
#     --tpu-type=v5p-128 -- btx_jax.train --config=configs/llama2_7b.py --workdir=gs://BUCKET/runs/seed
#
# By default xpk builds an image from --base-docker-image plus this checkout (tracked and untracked
# files, not git-ignored ones), and every pod installs it (`pip install -e . 'jax[tpu]'`) before
# running the command. With --docker-image the image is used as it is: it must hold the checkout
# in its working directory with btx_jax installed. The command runs with BTX_DISTRIBUTED=1
# (jax.distributed.initialize() finds the other hosts by itself; xpk sets up multislice).
# A workload of the same name (say, from an earlier try) is deleted first, so a rerun replaces it.
#
# Options (flag or environment variable):
#   --project=P             PROJECT            GCP project (required)
#   --zone=Z                ZONE               zone of the cluster (required)
#   --cluster=C             CLUSTER            GKE cluster made by `xpk cluster create` (required)
#   --name=W                WORKLOAD           workload name: [a-z][a-z0-9-]*, at most 40 (required)
#   --tpu-type=T            TPU_TYPE           e.g. v5p-128 (required)
#   --num-slices=S          NUM_SLICES         slices; S > 1 adds --config.mesh.data=S to a btx_jax command
#   --base-docker-image=I   BASE_DOCKER_IMAGE  default python:3.12
#   --docker-image=I        DOCKER_IMAGE       a ready image (see above) instead
#   --wait                  WAIT=1             wait for the workload; fail if it fails
#   --dry-run                                  print the commands, run nothing
#   --help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

PROJECT="${PROJECT:-}" ZONE="${ZONE:-}" CLUSTER="${CLUSTER:-}" WORKLOAD="${WORKLOAD:-}" TPU_TYPE="${TPU_TYPE:-}"
NUM_SLICES="${NUM_SLICES:-1}" BASE_DOCKER_IMAGE="${BASE_DOCKER_IMAGE:-python:3.12}" DOCKER_IMAGE="${DOCKER_IMAGE:-}"
WAIT="${WAIT:-0}"
parse_opts project=PROJECT zone=ZONE cluster=CLUSTER name=WORKLOAD workload=WORKLOAD tpu-type=TPU_TYPE \
  num-slices=NUM_SLICES base-docker-image=BASE_DOCKER_IMAGE docker-image=DOCKER_IMAGE wait!WAIT -- "$@"
require "$PROJECT" "GCP project" --project PROJECT my-project
require "$ZONE" zone --zone ZONE us-east5-a
require "$CLUSTER" "GKE cluster" --cluster CLUSTER my-cluster
require "$WORKLOAD" "workload name" --name WORKLOAD btx-seed
require "$TPU_TYPE" "TPU type" --tpu-type TPU_TYPE v5p-128
[[ $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#WORKLOAD} -le 40 ]] ||
  die "workload name '$WORKLOAD' is not valid for xpk" "use [a-z][a-z0-9-]*, at most 40 characters, not ending in -"
module_command "${ARGS[@]}"
need xpk "python3 -m venv ~/xpk && ~/xpk/bin/pip install xpk, then put ~/xpk/bin on PATH"

where=(--cluster="$CLUSTER" --project="$PROJECT" --zone="$ZONE")
job="BTX_DISTRIBUTED=1 python -m $(quote "$MODULE" "${MODULE_ARGS[@]}")"
if [[ -n $DOCKER_IMAGE ]]; then
  image=(--docker-image="$DOCKER_IMAGE")
else
  context="${TMPDIR:-/tmp}/btx_jax-$WORKLOAD"
  pack_checkout "$context.tar.gz"
  run_pipe "rm -rf $(quote "$context") && mkdir -p $(quote "$context") && tar -xzf $(quote "$context.tar.gz") -C $(quote "$context")"
  image=(--base-docker-image="$BASE_DOCKER_IMAGE" --script-dir="$context")
  job="pip install -q -e . 'jax[tpu]' && $job"
fi
probe xpk workload delete "${where[@]}" --workload="$WORKLOAD" --force || true
run xpk workload create "${where[@]}" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" \
  "${image[@]}" --command="$job"
if [[ $WAIT == 1 ]]; then
  run xpk workload list "${where[@]}" --wait-for-job-completion="$WORKLOAD"
fi

#!/usr/bin/env bash
# Runs one btx_jax entry point on every host of a TPU VM pod slice (or of several slices).
#
#   launch/tpu_pod.sh [OPTIONS] [--] MODULE [ARGS...]      (or: python -m MODULE ARGS...)
#   launch/tpu_pod.sh --project=P --zone=us-east5-a --name=btx-seed --accelerator-type=v5p-128 \
#     -- btx_jax.train --config=configs/llama2_7b.py --workdir=gs://BUCKET/runs/seed
#
# Creates the TPU if it does not exist (`tpu-vm create`, or a queued resource with --queued),
# copies this checkout (tracked and untracked files, not git-ignored ones) to every worker,
# sets up a venv there (~/btx_venv: Python >= 3.12, `pip install -e . 'jax[tpu]'`), then runs
# the command on all workers with BTX_DISTRIBUTED=1 (jax.distributed.initialize() finds the
# other hosts by itself) and streams their output. Preemption sends SIGTERM: the run saves a
# checkpoint, and rerunning the same command resumes from it.
#
# Options (flag or environment variable):
#   --project=P            PROJECT           GCP project (required)
#   --zone=Z               ZONE              zone, e.g. us-east5-a (required)
#   --name=N               TPU_NAME          TPU (or queued resource) name (required)
#   --accelerator-type=T   ACCELERATOR_TYPE  e.g. v5p-128, v5litepod-256, v6e-256 (required)
#   --version=V            TPU_VERSION       runtime version (default: the one for T's generation)
#   --queued               QUEUED=1          create through a queued resource (waits for capacity)
#   --num-slices=S         NUM_SLICES        multislice: S slices of T in one queued resource;
#                                            adds --config.mesh.data=S to a btx_jax command
#   --delete               DELETE=1          delete the TPU after the command succeeds
#   --dry-run                                print the commands, run nothing
#   --help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

PROJECT="${PROJECT:-}" ZONE="${ZONE:-}" TPU_NAME="${TPU_NAME:-}" ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
TPU_VERSION="${TPU_VERSION:-}" QUEUED="${QUEUED:-0}" NUM_SLICES="${NUM_SLICES:-1}" DELETE="${DELETE:-0}"
parse_opts project=PROJECT zone=ZONE name=TPU_NAME accelerator-type=ACCELERATOR_TYPE version=TPU_VERSION \
  queued!QUEUED num-slices=NUM_SLICES delete!DELETE -- "$@"
require "$PROJECT" "GCP project" --project PROJECT my-project
require "$ZONE" zone --zone ZONE us-east5-a
require "$TPU_NAME" "TPU name" --name TPU_NAME btx-seed
require "$ACCELERATOR_TYPE" "accelerator type" --accelerator-type ACCELERATOR_TYPE v5p-128
module_command "${ARGS[@]}"
need gcloud "install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) and run gcloud auth login"

if [[ -z $TPU_VERSION ]]; then
  case "$ACCELERATOR_TYPE" in
    v5p-*) TPU_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) TPU_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) TPU_VERSION=v2-alpha-tpuv6e ;;
    *) TPU_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
((NUM_SLICES == 1)) || QUEUED=1
where=(--zone="$ZONE" --project="$PROJECT")
if [[ $QUEUED == 1 ]]; then
  resource=(gcloud compute tpus queued-resources) hosts=(--worker=all --node=all)
else
  resource=(gcloud compute tpus tpu-vm) hosts=(--worker=all)
fi

create() {
  local create=("${resource[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE")
  if [[ $QUEUED != 1 ]]; then
    run "${create[@]}" --version="$TPU_VERSION"
  elif ((NUM_SLICES > 1)); then  # nodes NAME-0 ... NAME-(S-1)
    run "${create[@]}" --runtime-version="$TPU_VERSION" --node-count="$NUM_SLICES" --node-prefix="$TPU_NAME"
  else
    run "${create[@]}" --runtime-version="$TPU_VERSION" --node-id="$TPU_NAME"
  fi
}

wait_until_active() {  # a queued resource waits for capacity
  local query=("${resource[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state.state)') state
  printf '+ %s   # every 60 s until ACTIVE\n' "$(quote "${query[@]}")"
  [[ $DRY_RUN == 1 ]] && return
  while :; do
    state="$("${query[@]}")" || fail "could not describe queued resource $TPU_NAME"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) fail "queued resource $TPU_NAME is $state; delete it and rerun" ;;
    esac
    echo "[launch] $TPU_NAME is $state; waiting" >&2
    sleep 60
  done
}

on_all_hosts() {
  run "${resource[@]}" ssh "$TPU_NAME" "${where[@]}" "${hosts[@]}" --command="$1"
}

probe "${resource[@]}" describe "$TPU_NAME" "${where[@]}" || create
[[ $QUEUED != 1 ]] || wait_until_active
tarball="${TMPDIR:-/tmp}/btx_jax-$TPU_NAME.tar.gz"
pack_checkout "$tarball"
run "${resource[@]}" scp "$tarball" "$TPU_NAME:btx_jax.tar.gz" "${where[@]}" "${hosts[@]}"
venv='bash scripts/make_venv.sh ~/btx_venv || { python3 -m pip install -q --user uv && python3 -m uv venv --seed --python 3.12 ~/btx_venv; }'
on_all_hosts "rm -rf btx_jax && mkdir btx_jax && tar -xzf btx_jax.tar.gz -C btx_jax && cd btx_jax && ($venv) && ~/btx_venv/bin/pip install -q -e . 'jax[tpu]'"
on_all_hosts "cd btx_jax && BTX_DISTRIBUTED=1 ~/btx_venv/bin/python -m $(quote "$MODULE" "${MODULE_ARGS[@]}")"
if [[ $DELETE == 1 ]]; then
  if [[ $QUEUED == 1 ]]; then
    run "${resource[@]}" delete "$TPU_NAME" "${where[@]}" --force --quiet
  else
    run "${resource[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
  fi
fi

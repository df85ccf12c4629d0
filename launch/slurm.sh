#!/usr/bin/env bash
# Runs one btx_jax entry point as a SLURM batch job on GPU nodes.
#
#   launch/slurm.sh [OPTIONS] [--] MODULE [ARGS...]      (or: python -m MODULE ARGS...)
#   launch/slurm.sh --name=btx-seed --nodes=4 --partition=gpu --time=24:00:00 \
#     -- btx_jax.train --config=configs/llama2_7b.py --workdir=/shared/runs/seed
#
# Writes OUT_DIR/NAME.sbatch and submits it with sbatch; the job `srun`s
# `python -m MODULE ARGS...` from this checkout (on a filesystem the nodes share; set up once with
# `bash scripts/make_venv.sh && .venv/bin/pip install -e . 'jax[cuda12]'`), one process per GPU
# by default: jax.distributed.initialize() reads the SLURM variables and gives each process its
# GPU. With --per-node, one process per node sees all the node's GPUs and joins by the address of
# the first node instead (JAX's SLURM detection would give it only one GPU).
# The job's output goes to OUT_DIR/NAME-JOBID.out. sbatch also reads its own SBATCH_*
# variables (e.g. SBATCH_EXCLUSIVE=1, SBATCH_QOS=...).
#
# Options (flag or environment variable):
#   --name=N            JOB_NAME       job name (required)
#   --nodes=K           NODES          nodes (default 1)
#   --gpus-per-node=G   GPUS_PER_NODE  GPUs per node (default 8)
#   --per-node          PER_NODE=1     one process per node instead of one per GPU
#   --time=T            TIME_LIMIT     e.g. 24:00:00 (default: the partition's)
#   --partition=P       PARTITION      (default: the cluster's)
#   --account=A         ACCOUNT        (default: yours)
#   --python=PATH       PYTHON         default .venv/bin/python of this checkout
#   --out-dir=D         OUT_DIR        where the .sbatch file and the job output go (default runs/slurm)
#   --wait              WAIT=1         wait for the job to end; fail if it fails
#   --dry-run                          print the script and the commands, run nothing
#   --help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

JOB_NAME="${JOB_NAME:-}" NODES="${NODES:-1}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}" PER_NODE="${PER_NODE:-0}"
TIME_LIMIT="${TIME_LIMIT:-}" PARTITION="${PARTITION:-}" ACCOUNT="${ACCOUNT:-}" PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
OUT_DIR="${OUT_DIR:-$REPO/runs/slurm}"
WAIT="${WAIT:-0}"
parse_opts name=JOB_NAME nodes=NODES gpus-per-node=GPUS_PER_NODE per-node!PER_NODE time=TIME_LIMIT \
  partition=PARTITION account=ACCOUNT python=PYTHON out-dir=OUT_DIR wait!WAIT -- "$@"
require "$JOB_NAME" "job name" --name JOB_NAME btx-seed
[[ $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "job name '$JOB_NAME' has characters other than A-Z a-z 0-9 . _ -" "e.g. --name=btx-seed"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not '$NODES'" "e.g. --nodes=4"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, not '$GPUS_PER_NODE'" "e.g. --gpus-per-node=8"
module_command "${ARGS[@]}"
need sbatch "run this on a SLURM login node (sbatch on PATH)"
[[ $DRY_RUN == 1 || -x $PYTHON ]] ||
  die "no Python at $PYTHON" "bash scripts/make_venv.sh && .venv/bin/pip install -e . 'jax[cuda12]' (or --python=PATH)"

sbatch_script() {
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --ntasks-per-node=$([[ $PER_NODE == 1 ]] && echo 1 || echo "$GPUS_PER_NODE")"
  [[ -z $TIME_LIMIT ]] || echo "#SBATCH --time=$TIME_LIMIT"
  [[ -z $PARTITION ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z $ACCOUNT ]] || echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --output=$OUT_DIR/%x-%j.out"
  echo 'set -euo pipefail'
  echo "cd $(quote "$REPO")"
  local job
  job="$(quote "$PYTHON" -m "$MODULE" "${MODULE_ARGS[@]}")"
  if [[ $PER_NODE == 1 ]]; then
    # shellcheck disable=SC2016  # expanded when the job runs
    printf '%s\n' \
      '# One process per node, all its GPUs: join by address (JAX_* variables read by btx_jax.distributed),' \
      "# without SLURM_LOCALID (from which JAX's SLURM detection would give each process one GPU)." \
      'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' \
      'export JAX_COORDINATOR_ADDRESS="$head_node:$((SLURM_JOB_ID % 4096 + 61440))"' \
      'export JAX_NUM_PROCESSES="$SLURM_JOB_NUM_NODES"' \
      "# shellcheck disable=SC2016  # each task's own \$SLURM_PROCID" \
      "srun --kill-on-bad-exit=1 bash -c 'JAX_PROCESS_ID=\$SLURM_PROCID exec env -u SLURM_LOCALID \"\$@\"' _ $job"
  else
    echo "srun --kill-on-bad-exit=1 $job"
  fi
}

file="$OUT_DIR/$JOB_NAME.sbatch"
run mkdir -p "$OUT_DIR"
printf '+ cat > %s <<'"'EOF'"'\n%s\nEOF\n' "$(quote "$file")" "$(sbatch_script)"
[[ $DRY_RUN == 1 ]] || sbatch_script >"$file"
if [[ $WAIT == 1 ]]; then
  run sbatch --wait "$file"
else
  run sbatch "$file"
fi

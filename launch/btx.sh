#!/usr/bin/env bash
# Runs a BTX recipe's stages on cloud resources: the seed on one slice, every branch on a slice of
# its own at the same time, then the surgeon, then the finetune and the baselines (the stages of
# one group in parallel, the groups in order), each through tpu_pod.sh, gke_xpk.sh or slurm.sh.
#
#   launch/btx.sh --backend=tpu|gke|slurm --config=CFG --workdir=WD [--config.FIELD=V...] [OPTIONS] [-- BACKEND OPTIONS]
#   PROJECT=my-project ZONE=us-east5-a launch/btx.sh --backend=tpu \
#     --config=configs/llama2_7b.py --workdir=gs://BUCKET/runs/btx -- --queued --delete
#
# The stages come from `python -m btx_jax.recipe --config=CFG --workdir=WD --plan --plan_format=json`
# (with the --config.FIELD=V overrides given here, e.g. --config.recipe.target=v5p-128), or --plan-file. Stages the plan marks done are skipped, so rerunning the same command resumes
# a half-done recipe; a stage that stopped resumes from its own checkpoint. Each stage runs its
# plan `command` (python -m btx_jax.recipe ... --stage=NAME) from the checkout's root on a
# resource named PREFIX-STAGE ([a-z0-9-], at most 40 characters). The words after `--` go to the
# backend script for every stage (see its --help), e.g. --zone, --cluster, --partition; its
# environment variables (PROJECT, ZONE, CLUSTER, ...) work too. The TPU type defaults to the plan's
# target (a TPU one, e.g. v5p-128); a SLURM stage gets ceil(devices / gpus-per-node) nodes, and
# the GPUs per node default to the plan's target (8xH100: 8) or 8.
#
# Options (flag or environment variable):
#   --backend=B          BACKEND        tpu (TPU VMs), gke (xpk workloads) or slurm (required)
#   --config=CFG         CONFIG         recipe config, as for btx_jax.recipe (required without --plan-file)
#   --workdir=WD         WORKDIR        recipe workdir, e.g. gs://BUCKET/runs/btx (the same)
#   --plan-file=F        PLAN_FILE      read the plan JSON from F instead of asking btx_jax.recipe
#   --prefix=P           PREFIX         resource names are P-STAGE (default btx)
#   --gpus-per-node=G    GPUS_PER_NODE  slurm: GPUs per node (default: see above)
#   --python=PATH        PYTHON         the local Python that prints the plan (default .venv/bin/python)
#   --dry-run                           print every stage's commands (the backend's dry run), run nothing
#   --help
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

BACKEND="${BACKEND:-}" CONFIG="${CONFIG:-}" WORKDIR="${WORKDIR:-}" PLAN_FILE="${PLAN_FILE:-}" PREFIX="${PREFIX:-btx}"
GPUS_PER_NODE="${GPUS_PER_NODE:-}" PYTHON="${PYTHON:-}" CONFIG_ARGS=() rest=()
while (($#)) && [[ $1 != -- ]]; do  # --config.FIELD=V overrides go to the plan command
  if [[ $1 == --config.* ]]; then CONFIG_ARGS+=("$1"); else rest+=("$1"); fi
  shift
done
set -- "${rest[@]}" "$@"
parse_opts backend=BACKEND config=CONFIG workdir=WORKDIR plan-file=PLAN_FILE prefix=PREFIX \
  gpus-per-node=GPUS_PER_NODE python=PYTHON -- "$@"
BACKEND_OPTS=("${ARGS[@]}")
require "$BACKEND" backend --backend BACKEND tpu
case "$BACKEND" in
  tpu) script="$REPO/launch/tpu_pod.sh" ;;
  gke) script="$REPO/launch/gke_xpk.sh" ;;
  slurm) script="$REPO/launch/slurm.sh" ;;
  *) die "unknown backend '$BACKEND'" "--backend=tpu, gke or slurm" ;;
esac
if [[ -z $PLAN_FILE ]]; then
  require "$CONFIG" "recipe config" --config CONFIG configs/btx_demo.py
  require "$WORKDIR" "recipe workdir" --workdir WORKDIR gs://BUCKET/runs/btx
elif [[ $PLAN_FILE != /* ]]; then
  PLAN_FILE="$PWD/$PLAN_FILE"
fi
[[ -n $PYTHON ]] || if [[ -x $REPO/.venv/bin/python ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
cd "$REPO"

# The plan as lines: a header (target, estimated seconds), then one line per stage in group order:
# group, stage, resource name, done (0/1), devices, command (arguments separated by \x1f).
read -r -d '' PLAN_TO_LINES <<'PY' || true
import hashlib, json, re, sys
try:
    plan = json.load(sys.stdin)
    stages = {s["name"]: s for s in plan["stages"]}
    grouped = [stage for members in plan["groups"] for stage in members]
    if sorted(grouped) != sorted(stages):
        sys.exit(f"the groups {grouped} do not list each stage {sorted(stages)} once")
    estimate = plan.get("estimated_seconds")
    print(plan.get("target") or "-", f"{estimate / 3600:.1f} h" if estimate else "unknown", sep="\t")
    names = {}
    for group, members in enumerate(plan["groups"]):
        for stage in members:
            s = stages[stage]
            name = re.sub(r"[^a-z0-9]+", "-", f"{sys.argv[1]}-{stage}".lower()).strip("-")
            name = name if name[:1].isalpha() else "btx-" + name
            if len(name) > 40:
                name = name[:33].rstrip("-") + "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
            if name in names:
                sys.exit(f"stages {names[name]} and {stage} would both run as {name}")
            names[name] = stage
            command = [str(a) for a in s["command"]]
            if any(c in a for a in command for c in "\t\n\x1f"):
                sys.exit(f"stage {stage}: a command argument holds a tab or a newline")
            print(group, stage, name, int(bool(s.get("done"))), int(s.get("devices") or 0), "\x1f".join(command), sep="\t")
except (ValueError, KeyError, TypeError) as e:
    sys.exit(f"not a plan ({type(e).__name__}: {e})")
PY

if [[ -n $PLAN_FILE ]]; then
  [[ -r $PLAN_FILE ]] || die "cannot read the plan file $PLAN_FILE" "give an existing --plan-file"
  plan_json="$(<"$PLAN_FILE")"
else
  plan_cmd=("$PYTHON" -m btx_jax.recipe --config="$CONFIG" --workdir="$WORKDIR" "${CONFIG_ARGS[@]}" --plan --plan_format=json)
  echo "# plan: $(quote "${plan_cmd[@]}")"
  plan_json="$("${plan_cmd[@]}")" || fail "the plan command failed (above)"
fi
lines="$(python3 -c "$PLAN_TO_LINES" "$PREFIX" <<<"$plan_json")" || fail "could not read the plan"
IFS=$'\t' read -r target estimate <<<"${lines%%$'\n'*}"
stages=()
[[ $lines != *$'\n'* ]] || mapfile -t stages <<<"${lines#*$'\n'}"
[[ $target =~ ^[0-9]+x ]] && : "${GPUS_PER_NODE:=${target%%x*}}"
: "${GPUS_PER_NODE:=8}"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer" "e.g. --gpus-per-node=8"
[[ $target =~ ^v[0-9] ]] || target=-  # a GPU target is no TPU type
echo "# ${#stages[@]} stages, target $target, estimated $estimate; backend $BACKEND, names $PREFIX-STAGE"

# The backend command for one stage, as the array STAGE_CMD.
stage_command() {
  local name=$1 devices=$2
  local opts=(--name="$name")
  case "$BACKEND" in
    tpu) [[ $target == - ]] || opts+=(--accelerator-type="$target") ;;
    gke) [[ $target == - ]] || opts+=(--tpu-type="$target"); opts+=(--wait) ;;
    slurm)  # the stage's devices as whole nodes, fewer GPUs per node when fewer are needed
      local nodes=$(((devices + GPUS_PER_NODE - 1) / GPUS_PER_NODE)) gpus=$GPUS_PER_NODE
      ((nodes > 0)) || nodes=1
      ((devices % nodes != 0 || devices == 0)) || gpus=$((devices / nodes))
      ((nodes * gpus == devices)) || echo "# warning: $name gets $nodes x $gpus GPUs, its plan says $devices devices" >&2
      opts+=(--nodes="$nodes" --gpus-per-node="$gpus" --wait) ;;
  esac
  STAGE_CMD=("$script" "${opts[@]}" "${BACKEND_OPTS[@]}")
}

# prefixed STAGE: copies stdin to stdout, each line as `[STAGE] line`.
prefixed() {
  local out
  while IFS= read -r out || [[ -n $out ]]; do printf '[%s] %s\n' "$1" "$out"; done
}

# Launches the pending stages of one group together and waits for all of them.
run_group() {
  local group=$1 line stage name is_done devices args pending=() pids=() running=() failed=()
  shift
  for line; do
    IFS=$'\t' read -r _ stage _ is_done _ _ <<<"$line"
    if [[ $is_done == 1 ]]; then
      echo "# group $group: $stage is done, skipped"
    else
      pending+=("$stage")
    fi
  done
  ((${#pending[@]} < 2)) || echo "# group $group: ${pending[*]} at the same time"
  for line; do
    IFS=$'\t' read -r _ stage name is_done devices args <<<"$line"
    [[ $is_done == 0 ]] || continue
    IFS=$'\x1f' read -r -a args <<<"$args"
    stage_command "$name" "$devices"
    echo "# group $group: $stage on $name"
    printf '+ %s\n' "$(quote "${STAGE_CMD[@]}" -- "${args[@]}")"
    if [[ $DRY_RUN == 1 ]]; then  # also checks the backend's options (exit 2 when one is missing)
      "${STAGE_CMD[@]}" --dry-run -- "${args[@]}" </dev/null | prefixed "$stage"
      continue
    fi
    { "${STAGE_CMD[@]}" -- "${args[@]}" 2>&1 </dev/null | prefixed "$stage"; } &
    pids+=($!) running+=("$stage")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${running[$i]}")
  done
  ((${#failed[@]} == 0)) || fail "stage(s) ${failed[*]} failed (their output is above, prefixed with the stage name); rerun the same command to resume"
}

# Before starting anything, the first pending stage's backend dry run checks the options.
for line in "${stages[@]}"; do
  IFS=$'\t' read -r _ _ name is_done devices _ <<<"$line"
  if [[ $is_done == 0 && $DRY_RUN == 0 ]]; then
    stage_command "$name" "$devices"
    "${STAGE_CMD[@]}" --dry-run -- python -m btx_jax.recipe >/dev/null
    break
  fi
done

group=() current=
for line in "${stages[@]}"; do
  if [[ ${line%%$'\t'*} != "$current" && ${#group[@]} -gt 0 ]]; then
    run_group "$current" "${group[@]}"
    group=()
  fi
  current="${line%%$'\t'*}"
  group+=("$line")
done
((${#group[@]} == 0)) || run_group "$current" "${group[@]}"
if [[ $DRY_RUN == 1 ]]; then echo "# dry run: nothing was run"; else echo "# all stages done"; fi

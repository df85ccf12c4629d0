# shellcheck shell=bash
# Shared by the launch/ scripts (sourced): options, checks, and a runner that prints each command
# before running it, or only prints it with --dry-run.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "error: the launch scripts need bash >= 4.4 (this is $BASH_VERSION); on macOS: brew install bash" >&2
  exit 2
fi

REPO="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
SCRIPT="${0##*/}"

# The script's own header comment (after the #! line) is its --help.
usage() {
  local line
  while IFS= read -r line; do
    [[ $line == '#!'* ]] && continue
    [[ $line == '#'* ]] || break
    line="${line#\#}"
    printf '%s\n' "${line# }"
  done <"$0"
}

# die PROBLEM [FIX]: a usage error (exit 2), with the fix on its own line.
die() {
  printf 'error: %s\n' "$1" >&2
  [[ $# -lt 2 ]] || printf '  fix: %s\n' "$2" >&2
  exit 2
}

# fail PROBLEM: something went wrong while running (exit 1).
fail() {
  printf 'error: %s\n' "$1" >&2
  exit 1
}

# require VALUE WHAT FLAG VAR EXAMPLE: refuses (exit 2) when VALUE is empty.
require() {
  [[ -n $1 ]] || die "no $2 given" "pass $3=$5 or set $4=$5"
}

# need TOOL HOW-TO-INSTALL: refuses when TOOL is not on PATH (a dry run needs no tool).
need() {
  [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null || die "$1 not found on PATH" "$2"
}

# quote ARGS...: one shell-quoted line (an argument with special characters in single quotes, or
# in double quotes when it holds single quotes and nothing that double quotes would expand).
quote() {
  local arg out=()
  for arg; do
    if [[ -n $arg && $arg != *[!A-Za-z0-9_./:=,@%+-]* ]]; then
      out+=("$arg")
    elif [[ $arg == *\'* && $arg != *[\"\$\`\\!]* ]]; then
      out+=("\"$arg\"")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# run CMD...: prints `+ CMD`, then runs it unless this is a dry run.
run() {
  printf '+ %s\n' "$(quote "$@")"
  [[ $DRY_RUN == 1 ]] || "$@"
}

# run_pipe 'A | B': the same for a pipeline given as one string.
run_pipe() {
  printf '+ %s\n' "$1"
  [[ $DRY_RUN == 1 ]] || bash -o pipefail -c "$1"
}

# probe CMD...: prints `+ CMD` and runs it quietly; its status is the answer. A dry run says no.
probe() {
  printf '+ %s\n' "$(quote "$@")"
  [[ $DRY_RUN != 1 ]] && "$@" >/dev/null 2>&1
}

# parse_opts SPEC... -- "$@": SPEC is `name=VAR` (an option with a value: --name=V or --name V)
# or `name!VAR` (a switch: sets VAR=1). Handles --dry-run and --help; the words left after the
# options (and an optional `--`) go to ARGS.
parse_opts() {
  local -A spec=()
  local arg key kind var
  while [[ $1 != -- ]]; do
    key="${1%%[=!]*}"
    spec[$key]="${1:${#key}}"
    shift
  done
  shift
  while (($#)); do
    arg="$1"
    case "$arg" in
      --) shift; break ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --*) ;;
      *) break ;;
    esac
    key="${arg%%=*}"
    key="${key#--}"
    [[ -n ${spec[$key]:-} ]] || die "unknown option $arg" "see $SCRIPT --help"
    kind="${spec[$key]:0:1}"
    var="${spec[$key]:1}"
    if [[ $kind == '!' ]]; then
      [[ $arg != *=* ]] || die "--$key takes no value" "write --$key alone"
      printf -v "$var" 1
      shift
    elif [[ $arg == *=* ]]; then
      printf -v "$var" '%s' "${arg#*=}"
      shift
    else
      (($# >= 2)) || die "--$key needs a value" "write --$key=VALUE"
      printf -v "$var" '%s' "$2"
      shift 2
    fi
  done
  # shellcheck disable=SC2034  # read by the scripts
  ARGS=("$@")
}

# module_command ARGS...: the job's command, `MODULE ARGS...` or `[PATH/]python -m MODULE ARGS...`
# (the remote side uses its own Python), as MODULE and MODULE_ARGS. NUM_SLICES > 1 puts the
# `data` mesh axis across the slices.
module_command() {
  (($#)) || die "no command given" "end with the module to run, e.g. -- btx_jax.train --config=configs/llama2_7b.py --workdir=gs://BUCKET/runs/seed"
  if [[ ${1##*/} == python* ]]; then
    [[ ${2:-} == -m && $# -ge 3 ]] || die "the command must be python -m MODULE ..." "give MODULE ARGS... or python -m MODULE ARGS..."
    shift 2
  fi
  MODULE="$1"
  MODULE_ARGS=("${@:2}")
  local slices="${NUM_SLICES:-1}"
  [[ $slices =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, not '$slices'" "e.g. --num-slices=2"
  if ((slices > 1)) && [[ $MODULE == btx_jax.* && " ${MODULE_ARGS[*]} " != *" --config.mesh.data="* ]]; then
    MODULE_ARGS+=("--config.mesh.data=$slices")
  fi
}

# pack_checkout TARBALL: the checkout's files (tracked and untracked, not git-ignored) in one tarball.
pack_checkout() {
  run_pipe "cd $(quote "$REPO") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(quote "$1") -T -"
}

#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# One GPU machine, one process: run lct_jax training or evaluation on all local GPUs (jax uses every
# visible device; the data-parallel mesh spans them). `gpu_local.sh --help` lists the options.
set -euo pipefail

PROG=gpu_local.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

MODE=""
CONFIG=${LCT_CONFIG:-}
WORKDIR=${LCT_WORKDIR:-}
PYTHON=${LCT_PYTHON:-python}
GPUS=${LCT_GPUS:-}
OVERRIDES=()
ENVS=()

usage() {
  cat <<EOF
Usage: $PROG [--dry-run] train|eval --config PATH --workdir DIR [--gpus LIST] [--python PYTHON]
       [--env KEY=VALUE ...] [--config.a.b=VALUE ...]

Run one process on this machine that drives all its GPUs:
  train:  PYTHON -m lct_jax.main     --config=PATH --workdir=DIR [overrides]
  eval:   PYTHON -m lct_jax.evaluate --config=PATH --workdir=DIR [overrides]
The script execs the binary in the foreground, so Ctrl-C / SIGTERM reach it directly (training
saves a checkpoint on SIGTERM). Rerunning the same train command resumes from the newest
checkpoint in DIR. Relative paths are relative to the current directory (run it from the
repository root for configs/...).

Options (flag, or the environment variable in brackets):
  --config PATH      ml_collections config, e.g. configs/ffhq.py [LCT_CONFIG]          (required)
  --workdir DIR      checkpoints, logs and samples go here [LCT_WORKDIR]              (required)
  --gpus LIST        restrict to these GPUs: sets CUDA_VISIBLE_DEVICES=LIST, e.g. 0,1 [LCT_GPUS]
                     (default: all GPUs of the machine)
  --python PYTHON    interpreter with lct_jax and jax[cuda12] installed [LCT_PYTHON] (default: python)
  --env KEY=VALUE    extra environment variable for the run (repeatable),
                     e.g. --env XLA_PYTHON_CLIENT_MEM_FRACTION=.9
  --config.a.b=V     config overrides, passed through unchanged
  --dry-run          print the command (one line, prefixed '+ ') and run nothing [LCT_DRY_RUN=1]
  -h, --help         this help

Examples:
  $PROG --dry-run train --config=configs/ffhq.py --workdir=/data/runs/ffhq
  $PROG train --config=configs/ffhq.py --workdir=/data/runs/ffhq --gpus=0,1,2,3 --config.train.global_batch_size=256
  $PROG eval --config=configs/ffhq.py --workdir=/data/runs/ffhq
EOF
}

while (($#)); do
  arg=$1
  shift
  take_mode_or_override "$arg" "config overrides look like --config.a.b=VALUE" && continue
  split_opt "$arg"
  case $OPT in
    -h | --help) usage; exit 0 ;;
    --dry-run) no_value; DRY_RUN=1 ;;
    --config) need_value "$@"; CONFIG=$VALUE; shift "$SHIFT" ;;
    --workdir) need_value "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
    --gpus) need_value "$@"; GPUS=$VALUE; shift "$SHIFT" ;;
    --python) need_value "$@"; PYTHON=$VALUE; shift "$SHIFT" ;;
    --env)
      need_value "$@"; shift "$SHIFT"
      check_env_assignment "$VALUE"
      ENVS+=("$VALUE")
      ;;
    *) die "unknown option '$OPT'" ;;
  esac
done

check_run_args
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus takes a comma-separated list of GPU indices, got '$GPUS'"

module=lct_jax.main
[[ $MODE == eval ]] && module=lct_jax.evaluate
cmd=()
[[ -z $GPUS ]] || ENVS=("CUDA_VISIBLE_DEVICES=$GPUS" ${ENVS[@]+"${ENVS[@]}"})
((${#ENVS[@]} == 0)) || cmd=(env "${ENVS[@]}")
cmd+=("$PYTHON" -m "$module" --config="$CONFIG" --workdir="$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})

if [[ $DRY_RUN == 1 ]]; then
  run "${cmd[@]}"
  exit 0
fi
printf '+ %s\n' "$(quote_words "${cmd[@]}")" >&2
exec "${cmd[@]}"

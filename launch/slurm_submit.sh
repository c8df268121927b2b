#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Thin sbatch wrapper for launch/slurm_multinode.sbatch: turns flags into sbatch options, optionally
# chains jobs past the time limit. `slurm_submit.sh --help` lists the options.
set -euo pipefail

PROG=slurm_submit.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

MODE=""
CONFIG=${LCT_CONFIG:-}
WORKDIR=${LCT_WORKDIR:-}
PYTHON=${LCT_PYTHON:-}
NODES=${LCT_NODES:-}
GPUS_PER_NODE=${LCT_GPUS_PER_NODE:-}
TIME=${LCT_TIME:-}
PARTITION=${LCT_PARTITION:-}
ACCOUNT=${LCT_ACCOUNT:-}
QOS=${LCT_QOS:-}
JOB_NAME=${LCT_JOB_NAME:-}
CPUS_PER_TASK=${LCT_CPUS_PER_TASK:-}
OUTPUT=${LCT_OUTPUT:-}
CHAIN=1
OVERRIDES=()
SBATCH_EXTRA=()

usage() {
  cat <<EOF
Usage: $PROG [--dry-run] train|eval --config PATH --workdir DIR [--nodes N] [--gpus-per-node G]
       [--time T] [--partition P] [--account A] [--qos Q] [--job-name NAME] [--cpus-per-task C]
       [--output FILE] [--python PYTHON] [--chain K] [--config.a.b=VALUE ...] [-- SBATCH_OPTION ...]

Submit launch/slurm_multinode.sbatch: one task per node, each driving all GPUs of its node,
  srun PYTHON -m lct_jax.main (eval: lct_jax.evaluate) --config=PATH --workdir=DIR [overrides]
       --config.mesh.distributed=True
jax's SLURM auto-detection gives every process the coordinator address and its process id.
The job runs in the repository root ($ROOT) with the submitting shell's environment (activate
the virtualenv first). SIGTERM comes 120 s before the time limit (the binary saves a checkpoint);
preempted jobs are requeued and resume from the newest checkpoint.

Options (flag, or the environment variable in brackets; unset ones keep the batch script's
#SBATCH defaults: 2 nodes, 8 GPUs per node, 24:00:00):
  --config PATH          ml_collections config, relative to the repository root [LCT_CONFIG] (required)
  --workdir DIR          on a filesystem every node sees (no URLs) [LCT_WORKDIR]            (required)
  --nodes N              number of nodes = number of jax processes [LCT_NODES]
  --gpus-per-node G      GPUs per node [LCT_GPUS_PER_NODE]
  --time T               time limit, e.g. 24:00:00 or 2-00:00:00 [LCT_TIME]
  --partition P          [LCT_PARTITION]
  --account A            [LCT_ACCOUNT]
  --qos Q                [LCT_QOS]
  --job-name NAME        (default: lct_jax) [LCT_JOB_NAME]
  --cpus-per-task C      CPU cores per node task, for the data loader [LCT_CPUS_PER_TASK]
  --output FILE          SLURM output file, relative to the repository root (default: %x-%j.out) [LCT_OUTPUT]
  --python PYTHON        interpreter on the nodes (default: python from the exported PATH) [LCT_PYTHON]
  --chain K              submit K jobs, each starting after the previous one ends (afterany);
                         each resumes from the newest checkpoint: K x the time limit in all (default: 1)
  --config.a.b=V         config overrides, passed through unchanged
  -- SBATCH_OPTION ...   further sbatch options, e.g. -- --exclusive --constraint=h100
  --dry-run              print the sbatch command(s) (prefixed '+ ') and run nothing [LCT_DRY_RUN=1]
  -h, --help             this help

Examples:
  $PROG --dry-run train --config=configs/ffhq.py --workdir=/shared/runs/ffhq --nodes=4 --gpus-per-node=8
  $PROG train --config=configs/ffhq.py --workdir=/shared/runs/ffhq --nodes=4 --gpus-per-node=8 \\
      --time=24:00:00 --partition=gpu --chain=3 --config.train.global_batch_size=1024
EOF
}

positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    SBATCH_EXTRA=("$@")
    break
  fi
  take_mode_or_override "$arg" "sbatch options go after '--'" && continue
  split_opt "$arg"
  case $OPT in
    -h | --help) usage; exit 0 ;;
    --dry-run) no_value; DRY_RUN=1 ;;
    --config) need_value "$@"; CONFIG=$VALUE; shift "$SHIFT" ;;
    --workdir) need_value "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
    --python) need_value "$@"; PYTHON=$VALUE; shift "$SHIFT" ;;
    --nodes) need_value "$@"; NODES=$VALUE; shift "$SHIFT" ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE=$VALUE; shift "$SHIFT" ;;
    --time) need_value "$@"; TIME=$VALUE; shift "$SHIFT" ;;
    --partition) need_value "$@"; PARTITION=$VALUE; shift "$SHIFT" ;;
    --account) need_value "$@"; ACCOUNT=$VALUE; shift "$SHIFT" ;;
    --qos) need_value "$@"; QOS=$VALUE; shift "$SHIFT" ;;
    --job-name) need_value "$@"; JOB_NAME=$VALUE; shift "$SHIFT" ;;
    --cpus-per-task) need_value "$@"; CPUS_PER_TASK=$VALUE; shift "$SHIFT" ;;
    --output) need_value "$@"; OUTPUT=$VALUE; shift "$SHIFT" ;;
    --chain) need_value "$@"; CHAIN=$VALUE; shift "$SHIFT" ;;
    *) die "unknown option '$OPT' (sbatch options go after '--')" ;;
  esac
done

check_run_args
[[ -z $NODES ]] || positive_int --nodes "$NODES"
[[ -z $GPUS_PER_NODE ]] || positive_int --gpus-per-node "$GPUS_PER_NODE"
[[ -z $CPUS_PER_TASK ]] || positive_int --cpus-per-task "$CPUS_PER_TASK"
positive_int --chain "$CHAIN"
# --export is a comma-separated list: these values must not contain commas.
[[ $ROOT != *,* && $PYTHON != *,* ]] || die "the repository path and --python must not contain ','"

if [[ $DRY_RUN != 1 ]] && ! command -v sbatch >/dev/null; then
  die "sbatch not found on PATH (run this on a SLURM login node, or use --dry-run)"
fi

export_list="ALL,LCT_CODE_DIR=$ROOT"
[[ -z $PYTHON ]] || export_list+=",LCT_PYTHON=$PYTHON"
[[ -z $GPUS_PER_NODE ]] || export_list+=",LCT_GPUS_PER_NODE=$GPUS_PER_NODE"

opts=(--parsable --chdir="$ROOT" --export="$export_list")
[[ -z $NODES ]] || opts+=(--nodes="$NODES")
[[ -z $GPUS_PER_NODE ]] || opts+=(--gpus-per-node="$GPUS_PER_NODE")
[[ -z $TIME ]] || opts+=(--time="$TIME")
[[ -z $PARTITION ]] || opts+=(--partition="$PARTITION")
[[ -z $ACCOUNT ]] || opts+=(--account="$ACCOUNT")
[[ -z $QOS ]] || opts+=(--qos="$QOS")
[[ -z $JOB_NAME ]] || opts+=(--job-name="$JOB_NAME")
[[ -z $CPUS_PER_TASK ]] || opts+=(--cpus-per-task="$CPUS_PER_TASK")
[[ -z $OUTPUT ]] || opts+=(--output="$OUTPUT")

script_args=("$HERE/slurm_multinode.sbatch" "$MODE" --config="$CONFIG" --workdir="$WORKDIR")
script_args+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})

previous=""
for ((i = 1; i <= CHAIN; i++)); do
  dependency=()
  [[ -z $previous ]] || dependency=(--dependency="afterany:$previous")
  capture "JOBID_$i" sbatch "${opts[@]}" ${dependency[@]+"${dependency[@]}"} \
    ${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"} "${script_args[@]}"
  previous=${CAPTURED%%;*} # --parsable prints JOBID or JOBID;CLUSTER
  [[ -n $previous ]] || { echo "$PROG: sbatch printed no job id" >&2; exit 1; }
  [[ $DRY_RUN == 1 ]] || echo "submitted job $previous ($i of $CHAIN)"
done

#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Cloud TPU VM slices (single- or multi-host) for lct_jax through gcloud: create the slice, ship the
# code to every worker, start training/evaluation on all workers at once, read a worker's log, stop
# the jobs by their recorded pids, delete the slice. `tpu_pod.sh --help` lists everything.
set -euo pipefail

PROG=tpu_pod.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

SUBCOMMANDS="create setup train eval logs stop delete ssh"

NAME=${LCT_TPU_NAME:-}
ZONE=${LCT_TPU_ZONE:-}
PROJECT=${LCT_GCP_PROJECT:-}
TYPE=${LCT_TPU_TYPE:-}
VERSION=${LCT_TPU_VERSION:-}
CONFIG=${LCT_CONFIG:-}
WORKDIR=${LCT_WORKDIR:-}
REMOTE_DIR=${LCT_REMOTE_DIR:-lct_jax}
PYTHON=${LCT_PYTHON:-python3}
REF=${LCT_REF:-WORKTREE}
GRACE=${LCT_STOP_GRACE:-150}
IAP=0
INTERNAL_IP=0
CAPACITY=""
WORKER=""
JOB=""
LINES=100
FOLLOW=0
YES=0
SUBCMD=""
WANT_HELP=0
OVERRIDES=()
ENVS=()
REST=()
USED=()

usage() {
  cat <<EOF
Usage: $PROG [--dry-run] SUBCOMMAND [OPTIONS] [--config.a.b=VALUE ...]

Run lct_jax on a Cloud TPU VM slice (e.g. v4-32 = 4 hosts) with gcloud. Every host ("worker")
runs the same command; the binaries call jax.distributed.initialize() themselves, which finds
the coordinator and the process ids from the TPU metadata.

Subcommands:
  create   create the TPU VM slice (gcloud compute tpus tpu-vm create)
  setup    ship the code (git archive tarball, scp --worker=all) and pip install it on every worker
  train    start 'python -m lct_jax.main' on every worker under nohup (pid + log files)
  eval     start 'python -m lct_jax.evaluate' on every worker the same way
  logs     print (or follow) the train/eval log of one worker
  stop     SIGTERM the recorded pids on every worker (checkpoint on SIGTERM), SIGKILL after a grace
  delete   delete the TPU VM slice
  ssh      run a shell command on the workers (e.g. to install a Python)
'$PROG SUBCOMMAND --help' describes one subcommand.

Options for every subcommand (flag, or the environment variable in brackets):
  --name NAME         TPU VM name [LCT_TPU_NAME]                            (required)
  --zone ZONE         e.g. us-central2-b [LCT_TPU_ZONE]                     (required)
  --project PROJECT   GCP project; gcloud's default when unset [LCT_GCP_PROJECT]
  --remote-dir DIR    per-worker directory, relative to the remote \$HOME or absolute
                      [LCT_REMOTE_DIR] (default: lct_jax). Inside it: code/ (the code), venv/,
                      run/train.{pid,log} and run/eval.{pid,log}
  --internal-ip       ssh/scp to the workers' internal IPs (from a machine inside their VPC)
  --iap               ssh/scp through Cloud IAP (workers without external IPs); uses
                      'gcloud alpha compute tpus tpu-vm ssh|scp --tunnel-through-iap'
  --dry-run           print each command (one per line, prefixed '+ ') and run nothing
                      [LCT_DRY_RUN=1]
  -h, --help          this help, or a subcommand's help after the subcommand

Examples:
  $PROG --dry-run create --name=lct-v4 --zone=us-central2-b --type=v4-32 --version=tpu-ubuntu2204-base --spot
  $PROG setup --name=lct-v4 --zone=us-central2-b
  $PROG train --name=lct-v4 --zone=us-central2-b --config=configs/ffhq.py --workdir=/mnt/shared/ffhq --config.train.global_batch_size=512
  $PROG logs --name=lct-v4 --zone=us-central2-b --worker=0 --follow
  $PROG stop --name=lct-v4 --zone=us-central2-b
  $PROG delete --name=lct-v4 --zone=us-central2-b
EOF
}

help_create() {
  cat <<EOF
Usage: $PROG create --name NAME --zone ZONE --type TYPE --version RUNTIME [--spot | --preemptible]

Create the TPU VM slice.
  --type TYPE        accelerator type, e.g. v4-8, v4-32, v5litepod-16, v6e-16 [LCT_TPU_TYPE]
  --version RUNTIME  TPU software version, e.g. tpu-ubuntu2204-base (v4/v5p),
                     v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e) [LCT_TPU_VERSION]
  --spot             Spot capacity (cheaper, can be reclaimed at any time)
  --preemptible      preemptible capacity (older form of --spot)

Runs: gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME
EOF
}

help_setup() {
  cat <<EOF
Usage: $PROG setup --name NAME --zone ZONE [--ref REF] [--python PYTHON]

Ship the code to every worker and install it:
  1. git archive a tarball locally (ignored files such as .venv/ and build/ are left out),
  2. gcloud ... scp --recurse --worker=all the tarball to REMOTE_DIR/code.tar.gz,
  3. on --worker=all: unpack into REMOTE_DIR/code, create REMOTE_DIR/venv, then
     pip install -r requirements.txt -e .  and  pip install -U "jax[tpu]==<the pinned jax version>".
Refuses on a worker where a train/eval job is still running. Rerun after every code change.

  --ref REF          what to ship [LCT_REF]: WORKTREE (default) = the working tree as it is now,
                     uncommitted and untracked-but-not-ignored files included (snapshotted through a
                     temporary git index; nothing is committed), or any commit/branch/tag, e.g. HEAD
  --python PYTHON    interpreter on the workers that creates the venv [LCT_PYTHON] (default: python3).
                     requirements.txt pins versions for Python 3.11; images that ship an older Python
                     need one installed first, e.g. with '$PROG ssh ... -- sudo apt-get ...'
EOF
}

help_run() {  # train and eval
  local binary=lct_jax.main
  [[ $1 == eval ]] && binary=lct_jax.evaluate
  cat <<EOF
Usage: $PROG $1 --name NAME --zone ZONE --config PATH --workdir DIR [--env KEY=VALUE ...]
       [--config.a.b=VALUE ...] [-- --config.a.b=VALUE ...]

On --worker=all, in REMOTE_DIR/code, start under nohup:
  REMOTE_DIR/venv/bin/python -m $binary --config=PATH --workdir=DIR [overrides] --config.mesh.distributed=True
Each worker appends its output to REMOTE_DIR/run/$1.log and writes the pid to REMOTE_DIR/run/$1.pid.
Refuses on a worker where a train/eval job is already running. Rerunning '$PROG train' with the same
workdir resumes from the newest checkpoint.

  --config PATH      ml_collections config, relative to the repository root [LCT_CONFIG]
  --workdir DIR      a directory every worker sees at the same path (an NFS / Filestore share;
                     a single-host slice may use its own disk) [LCT_WORKDIR]; URLs are refused:
                     the binaries write checkpoints with local file I/O
  --env KEY=VALUE    environment variable for the job (repeatable), e.g. --env LIBTPU_INIT_ARGS=...
  --config.a.b=V     config overrides, passed through unchanged (also accepted after '--')
EOF
}

help_logs() {
  cat <<EOF
Usage: $PROG logs --name NAME --zone ZONE [--worker N] [--job train|eval] [--lines N] [--follow]

Print the end of a worker's log, REMOTE_DIR/run/JOB.log (tail).
  --worker N         worker index (default: 0, which also holds process 0's metrics lines), a
                     list (1,4,6), a range (1-3) or all
  --job JOB          train (default) or eval
  --lines N          number of lines (default: 100)
  -f, --follow       keep following the log (tail -F); Ctrl-C ends it, the job keeps running
EOF
}

help_stop() {
  cat <<EOF
Usage: $PROG stop --name NAME --zone ZONE [--job train|eval|all] [--grace SECONDS]

On --worker=all: read the pid recorded in REMOTE_DIR/run/JOB.pid, check that this pid is still an
lct_jax process (so a stale pid that the OS reused is left alone), send it SIGTERM (the binaries save
a checkpoint and exit), wait up to the grace period, then SIGKILL; remove the pid file. Processes
are found only through the pid files, never by name.
  --job JOB          train, eval or all (default: all)
  --grace SECONDS    wait this long after SIGTERM before SIGKILL [LCT_STOP_GRACE] (default: 150)
EOF
}

help_delete() {
  cat <<EOF
Usage: $PROG delete --name NAME --zone ZONE [--yes]

Delete the TPU VM slice (gcloud compute tpus tpu-vm delete). Local disks of the workers are lost;
a workdir on a share outside the slice stays.
  --yes              do not ask for confirmation (passes --quiet to gcloud)
EOF
}

help_ssh() {
  cat <<EOF
Usage: $PROG ssh --name NAME --zone ZONE [--worker N|all] -- COMMAND...

Run a shell command on the workers (default: --worker=all; also an index, a list 1,4,6 or a range
1-3). The words after '--' form the command.
Example: $PROG ssh --name=lct-v4 --zone=us-central2-b --worker=0 -- 'ls \$HOME/lct_jax/run'
         $PROG ssh --name=lct-v4 --zone=us-central2-b -- 'sudo apt-get install -y python3.11-venv'
EOF
}

subcommand_help() {
  case $1 in
    create) help_create ;;
    setup) help_setup ;;
    train | eval) help_run "$1" ;;
    logs) help_logs ;;
    stop) help_stop ;;
    delete) help_delete ;;
    ssh) help_ssh ;;
  esac
}

# Options a subcommand accepts on top of the global ones.
subcommand_options() {
  case $1 in
    create) echo "--type --version --spot --preemptible" ;;
    setup) echo "--ref --python" ;;
    train | eval) echo "--config --workdir --env" ;;
    logs) echo "--worker --job --lines --follow" ;;
    stop) echo "--job --grace" ;;
    delete) echo "--yes" ;;
    ssh) echo "--worker" ;;
  esac
}

is_subcommand() {
  case " $SUBCOMMANDS " in *" $1 "*) return 0 ;; esac
  return 1
}

# ---- parse ---------------------------------------------------------------------------------------
while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    REST=("$@")
    break
  fi
  if [[ $arg == --config.* ]]; then
    check_override "$arg"
    OVERRIDES+=("$arg")
    continue
  fi
  if [[ $arg != -* ]]; then
    [[ -z $SUBCMD ]] || die "unexpected argument '$arg' (config overrides look like --config.a.b=VALUE)"
    is_subcommand "$arg" || die "unknown subcommand '$arg' (one of: $SUBCOMMANDS)"
    SUBCMD=$arg
    continue
  fi
  split_opt "$arg"
  case $OPT in
    -h | --help) WANT_HELP=1 ;;
    --dry-run) no_value; DRY_RUN=1 ;;
    --iap) no_value; IAP=1 ;;
    --internal-ip) no_value; INTERNAL_IP=1 ;;
    --name) need_value "$@"; NAME=$VALUE; shift "$SHIFT" ;;
    --zone) need_value "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
    --project) need_value "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$VALUE; shift "$SHIFT" ;;
    --type) need_value "$@"; TYPE=$VALUE; shift "$SHIFT" ;;
    --version) need_value "$@"; VERSION=$VALUE; shift "$SHIFT" ;;
    --spot | --preemptible)
      no_value
      [[ -z $CAPACITY || $CAPACITY == "$OPT" ]] || die "--spot and --preemptible exclude each other"
      CAPACITY=$OPT
      ;;
    --ref) need_value "$@"; REF=$VALUE; shift "$SHIFT" ;;
    --python) need_value "$@"; PYTHON=$VALUE; shift "$SHIFT" ;;
    --config) need_value "$@"; CONFIG=$VALUE; shift "$SHIFT" ;;
    --workdir) need_value "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
    --env)
      need_value "$@"; shift "$SHIFT"
      check_env_assignment "$VALUE"
      ENVS+=("$VALUE")
      ;;
    --worker) need_value "$@"; WORKER=$VALUE; shift "$SHIFT" ;;
    --job) need_value "$@"; JOB=$VALUE; shift "$SHIFT" ;;
    --lines) need_value "$@"; LINES=$VALUE; shift "$SHIFT" ;;
    -f | --follow) no_value; OPT=--follow; FOLLOW=1 ;;
    --grace) need_value "$@"; GRACE=$VALUE; shift "$SHIFT" ;;
    --yes) no_value; YES=1 ;;
    *) die "unknown option '$OPT'" ;;
  esac
  USED+=("$OPT")
done

if ((WANT_HELP)); then
  if [[ -z $SUBCMD ]]; then usage; else subcommand_help "$SUBCMD"; fi
  exit 0
fi
[[ -n $SUBCMD ]] || die "missing subcommand (one of: $SUBCOMMANDS)"

for opt in ${USED[@]+"${USED[@]}"}; do
  case " -h --help --dry-run --iap --internal-ip --name --zone --project --remote-dir $(subcommand_options "$SUBCMD") " in
    *" $opt "*) ;;
    *) die "option $opt does not apply to '$SUBCMD' (see '$PROG $SUBCMD --help')" ;;
  esac
done
if ((${#OVERRIDES[@]})) && [[ $SUBCMD != train && $SUBCMD != eval ]]; then
  die "config overrides (${OVERRIDES[0]} ...) apply only to train and eval"
fi
if ((${#REST[@]})); then
  case $SUBCMD in
    ssh) ;;
    train | eval)
      for arg in "${REST[@]}"; do
        [[ $arg == --config.* ]] || die "after '--' $SUBCMD takes only --config.a.b=VALUE overrides, got '$arg'"
        check_override "$arg"
        OVERRIDES+=("$arg")
      done
      ;;
    *) die "'$SUBCMD' takes no arguments after '--'" ;;
  esac
fi

[[ -n $NAME ]] || die "missing --name (or LCT_TPU_NAME)"
[[ -n $ZONE ]] || die "missing --zone (or LCT_TPU_ZONE)"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_./-]+$ ]] ||
  die "--remote-dir may only contain letters, digits and _ . / - (got '$REMOTE_DIR')"
REMOTE_DIR=${REMOTE_DIR%/}
if [[ $REMOTE_DIR == /* ]]; then R_SH=$REMOTE_DIR; else R_SH="\$HOME/$REMOTE_DIR"; fi

if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found on PATH (install the Google Cloud SDK, or use --dry-run)"
fi
((IAP + INTERNAL_IP < 2)) || die "--iap and --internal-ip exclude each other"
GCLOUD=(gcloud compute tpus tpu-vm)
# ssh and scp: --tunnel-through-iap exists only in gcloud's alpha track.
GCLOUD_SSH=("${GCLOUD[@]}")
((IAP == 0)) || GCLOUD_SSH=(gcloud alpha compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")
SSH_EXTRA=()
((IAP == 0)) || SSH_EXTRA=(--tunnel-through-iap)
((INTERNAL_IP == 0)) || SSH_EXTRA=(--internal-ip)

# remote WORKER COMMAND: run a shell command on the workers over gcloud ssh.
remote() {
  run "${GCLOUD_SSH[@]}" ssh "$NAME" "${LOCATION[@]}" --worker="$1" ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} \
    --command="$2"
}

# Shell snippet (POSIX sh, runs on the workers): `alive FILE` succeeds when FILE holds the pid of a
# live lct_jax process. The cmdline check guards against a stale pid the OS has given to another
# process since; processes are never looked up by name.
# shellcheck disable=SC2016  # these snippets expand on the workers
ALIVE='alive() { [ -f "$1" ] && P=$(cat "$1") && [ -n "$P" ] && kill -0 "$P" 2>/dev/null && grep -qa lct_jax "/proc/$P/cmdline" 2>/dev/null; }'
# Refuses (exit 1) when a train or eval job recorded in the pid files still runs on this worker.
# shellcheck disable=SC2016
NOT_BUSY='for J in train eval; do if alive "$R/run/$J.pid"; then echo "$(hostname): $J is running (pid $P); run stop first" >&2; exit 1; fi; done'

check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+([-,][0-9]+)*$ ]] ||
    die "--worker takes a worker index, a list (1,4,6), a range (1-3) or all; got '$1'"
}

# ---- subcommands ---------------------------------------------------------------------------------
cmd_create() {
  [[ -n $TYPE ]] || die "missing --type (or LCT_TPU_TYPE), e.g. --type=v4-32"
  [[ -n $VERSION ]] || die "missing --version (or LCT_TPU_VERSION), e.g. --version=tpu-ubuntu2204-base"
  local args=("${GCLOUD[@]}" create "$NAME" "${LOCATION[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ -z $CAPACITY ]] || args+=("$CAPACITY")
  run "${args[@]}"
}

# The jax version pinned in requirements.txt at what setup ships.
pinned_jax_version() {
  local text
  if [[ $REF == WORKTREE ]]; then
    text=$(cat "$ROOT/requirements.txt" 2>/dev/null || true)
  else
    text=$(git -C "$ROOT" show "$REF:requirements.txt" 2>/dev/null || true)
  fi
  printf '%s\n' "$text" | sed -n 's/^jax==\([0-9][0-9a-z.]*\).*/\1/p' | head -n 1
}

cmd_setup() {
  command -v git >/dev/null || die "git is needed to build the code tarball"
  git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git repository"
  if [[ $REF != WORKTREE ]]; then
    git -C "$ROOT" rev-parse --verify --quiet "$REF^{tree}" >/dev/null ||
      die "--ref '$REF' is not a commit, branch or tag of $ROOT (or use --ref=WORKTREE)"
  fi
  local jax_version
  jax_version=$(pinned_jax_version)
  [[ -n $jax_version ]] || die "no 'jax==VERSION' line in requirements.txt ($REF)"

  local tmp tarball tree
  if [[ $DRY_RUN == 1 ]]; then
    tmp="${TMPDIR:-/tmp}/lct_jax_setup.DRYRUN"
  else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/lct_jax_setup.XXXXXX")
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
  fi
  tarball="$tmp/code.tar.gz"
  if [[ $REF == WORKTREE ]]; then
    # Snapshot the working tree through a temporary index: tracked and untracked files, minus
    # .gitignore'd ones. The real index, HEAD and the branch are not touched.
    local index real_index
    index="$tmp/index"
    real_index=$(git -C "$ROOT" rev-parse --git-path index)
    [[ $real_index == /* ]] || real_index="$ROOT/$real_index"
    [[ ! -f $real_index ]] || run cp "$real_index" "$index"
    run env GIT_INDEX_FILE="$index" git -C "$ROOT" add -A
    capture WORKTREE_TREE env GIT_INDEX_FILE="$index" git -C "$ROOT" write-tree
    tree=$CAPTURED
  else
    tree=$REF
  fi
  run git -C "$ROOT" archive --format=tar.gz --output="$tarball" "$tree"

  local r="R=$R_SH"
  remote all "$r; mkdir -p \"\$R/run\""
  run "${GCLOUD_SSH[@]}" scp --recurse --worker=all "${LOCATION[@]}" ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} \
    "$tarball" "$NAME:$REMOTE_DIR/code.tar.gz"
  local py pip_jax
  py=$(rquote "$PYTHON")
  pip_jax=$(rquote "jax[tpu]==$jax_version")
  remote all "set -e; $r; $ALIVE; $NOT_BUSY; rm -rf \"\$R/code\"; mkdir -p \"\$R/code\"; tar -xzf \"\$R/code.tar.gz\" -C \"\$R/code\"; [ -x \"\$R/venv/bin/python\" ] || $py -m venv \"\$R/venv\" || { echo \"\$(hostname): cannot create a venv with $py (install its venv package or pass --python)\" >&2; exit 1; }; cd \"\$R/code\"; \"\$R/venv/bin/python\" -m pip install -q -U pip; \"\$R/venv/bin/python\" -m pip install -r requirements.txt -e .; \"\$R/venv/bin/python\" -m pip install -U $pip_jax; echo \"\$(hostname): lct_jax installed in \$R\""
}

cmd_train_or_eval() {
  local job=$1 module=lct_jax.main
  [[ $job == eval ]] && module=lct_jax.evaluate
  [[ -n $CONFIG ]] || die "missing --config (or LCT_CONFIG), e.g. --config=configs/ffhq.py"
  [[ -n $WORKDIR ]] || die "missing --workdir (or LCT_WORKDIR), e.g. --workdir=/mnt/shared/run"
  [[ $WORKDIR != *://* ]] ||
    die "--workdir=$WORKDIR: URLs are not supported (the binaries write checkpoints with local file I/O); give a directory every worker sees, e.g. an NFS / Filestore share mounted at the same path"

  local words=("$module" --config="$CONFIG" --workdir="$WORKDIR")
  words+=(${OVERRIDES[@]+"${OVERRIDES[@]}"} --config.mesh.distributed=True)
  local env_prefix=""
  ((${#ENVS[@]} == 0)) || env_prefix="env $(rquote_words "${ENVS[@]}") "
  local log="\"\$R/run/$job.log\"" pid="\"\$R/run/$job.pid\""
  remote all "set -e; R=$R_SH; $ALIVE; $NOT_BUSY; mkdir -p \"\$R/run\"; [ -d \"\$R/code\" ] || { echo \"\$(hostname): no code in \$R/code; run setup first\" >&2; exit 1; }; cd \"\$R/code\"; echo \"=== \$(date -u) \$(hostname): start $job\" >> $log; nohup $env_prefix\"\$R/venv/bin/python\" -m $(rquote_words "${words[@]}") >> $log 2>&1 < /dev/null & echo \$! > $pid; echo \"\$(hostname): $job started, pid \$!, log \$R/run/$job.log\""
}

cmd_logs() {
  local worker=${WORKER:-0} job=${JOB:-train} follow=""
  [[ $job == train || $job == eval ]] || die "--job must be train or eval, got '$job'"
  check_worker "$worker"
  [[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
  ((FOLLOW == 0)) || follow=" -F"
  remote "$worker" "R=$R_SH; tail -n $LINES$follow \"\$R/run/$job.log\""
}

cmd_stop() {
  local jobs
  case ${JOB:-all} in
    train | eval) jobs=$JOB ;;
    all) jobs="train eval" ;;
    *) die "--job must be train, eval or all, got '$JOB'" ;;
  esac
  [[ $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '$GRACE'"
  remote all "R=$R_SH; $ALIVE; for J in $jobs; do F=\"\$R/run/\$J.pid\"; if [ ! -f \"\$F\" ]; then echo \"\$(hostname): no \$J pid file\"; continue; fi; if alive \"\$F\"; then echo \"\$(hostname): SIGTERM to \$J pid \$P\"; kill -TERM \"\$P\"; N=0; while alive \"\$F\" && [ \$N -lt $GRACE ]; do sleep 1; N=\$((N+1)); done; if alive \"\$F\"; then echo \"\$(hostname): \$J pid \$P alive after $GRACE s, SIGKILL\"; kill -KILL \"\$P\"; fi; echo \"\$(hostname): \$J stopped\"; else echo \"\$(hostname): \$J pid \$(cat \"\$F\") is not running\"; fi; rm -f \"\$F\"; done"
}

cmd_delete() {
  local args=("${GCLOUD[@]}" delete "$NAME" "${LOCATION[@]}")
  ((YES == 0)) || args+=(--quiet)
  run "${args[@]}"
}

cmd_ssh() {
  ((${#REST[@]})) || die "ssh needs a command after '--', e.g. $PROG ssh --name=NAME --zone=ZONE -- uptime"
  local worker=${WORKER:-all}
  check_worker "$worker"
  remote "$worker" "${REST[*]}"
}

case $SUBCMD in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train | eval) cmd_train_or_eval "$SUBCMD" ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  ssh) cmd_ssh ;;
esac

# shellcheck shell=bash disable=SC2034  # VALUE, SHIFT, MODE, CAPTURED are read by the sourcing script
# Helpers shared by the launch scripts (sourced, never executed): errors, shell quoting, option
# values and the dry-run aware command runner. Written for bash >= 3.2 (macOS's /bin/bash too):
# no namerefs, and empty arrays are expanded as ${a[@]+"${a[@]}"} because of set -u. The batch
# script slurm_multinode.sbatch does not source this file: sbatch runs a spooled copy of it.

# Set to 1 by --dry-run (or LCT_DRY_RUN=1 in the environment).
DRY_RUN=${LCT_DRY_RUN:-0}

# die MESSAGE...: print an error naming the script, point at --help, exit 2 (usage error).
die() {
  printf '%s: error: %s\n' "${PROG:-launch}" "$*" >&2
  printf "Run '%s --help' for usage.\n" "${PROG:-launch}" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "${PROG:-launch}" "$*" >&2
}

# quote WORD: print WORD so that a POSIX shell reads it back as one word. Plain words stay bare so
# that dry-run output stays readable; everything else is single-quoted.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# quote_words WORD...: the words quoted and joined by single spaces.
quote_words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

# rquote WORD: like quote, for words inside a command string that a remote shell runs: double
# quotes when nothing in WORD expands inside them (keeps nested dry-run output readable).
rquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$s"
  else
    quote "$s"
  fi
}

rquote_words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(rquote "$w")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print '+ CMD ARGS' (one line, copy-pasteable); run it unless this is a dry run.
# Dry runs print to stdout (that is their output); real runs echo the command to stderr, like set -x.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_words "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_words "$@")" >&2
  "$@"
}

# capture PLACEHOLDER CMD ARGS...: like run, and store the command's stdout (trailing newlines
# stripped) in CAPTURED. A dry run stores PLACEHOLDER instead.
capture() {
  local placeholder=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_words "$@")"
    CAPTURED=$placeholder
    return 0
  fi
  printf '+ %s\n' "$(quote_words "$@")" >&2
  CAPTURED=$("$@")
}

# Option parsing. The caller splits each argument into OPT and, for --opt=value, INLINE (unset
# when there is no '='), then calls need_value "$@" (the remaining arguments) for an option that
# takes a value: it sets VALUE and SHIFT (how many more arguments to shift: 0 or 1).
split_opt() {
  unset INLINE
  OPT=$1
  if [[ $1 == --*=* ]]; then
    OPT=${1%%=*}
    INLINE=${1#*=}
  fi
}

need_value() {
  if [[ -n ${INLINE+x} ]]; then
    VALUE=$INLINE
    SHIFT=0
  elif (($#)) && [[ $1 != --* ]]; then
    VALUE=$1
    SHIFT=1
  else
    die "option $OPT needs a value ($OPT=VALUE)"
  fi
}

# no_value: for a boolean flag given as --flag=value.
no_value() {
  [[ -z ${INLINE+x} ]] || die "option $OPT takes no value"
}

# check_override ARG: a --config.a.b=v override must carry its value after '='.
check_override() {
  [[ $1 == --config.?*=* ]] || die "config override '$1' needs a value: --config.a.b=VALUE"
}

# check_env_assignment ARG: KEY=VALUE with a valid shell variable name.
check_env_assignment() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$1'"
}

# take_mode_or_override ARG HINT: for the train|eval launchers. A --config.a.b=VALUE override is
# appended to OVERRIDES, a bare word becomes MODE (train or eval, once; HINT ends the error for a
# second one); returns 1 for anything else (an option for the caller's own parser).
take_mode_or_override() {
  if [[ $1 == --config.* ]]; then
    check_override "$1"
    OVERRIDES+=("$1")
  elif [[ $1 != -* ]]; then
    [[ -z $MODE ]] || die "unexpected argument '$1' ($2)"
    [[ $1 == train || $1 == eval ]] || die "unknown subcommand '$1' (train or eval)"
    MODE=$1
  else
    return 1
  fi
}

# check_run_args: the subcommand, --config and --workdir every train|eval launcher needs.
check_run_args() {
  [[ -n $MODE ]] || die "missing subcommand: train or eval"
  [[ -n $CONFIG ]] || die "missing --config (or LCT_CONFIG), e.g. --config=configs/ffhq.py"
  [[ -n $WORKDIR ]] || die "missing --workdir (or LCT_WORKDIR)"
}

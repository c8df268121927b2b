"""What the binaries share: absl logging set-up, and `run`, which reports a failure as one line.

`run(main, prog)` replaces `absl.app.run(main)`. A failure ends the process with one line on
stderr, `PROG: error: <what, naming the key or file>`, and exit status:

* 2 while the flags are parsed (a config key that does not exist, a config file that does not
  load);
* 1 while the job runs.

A config with several problems gets one such line per problem. `--traceback` shows the Python
traceback as well.
"""

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

_TRACEBACK = flags.DEFINE_bool(
  "traceback", False, "On failure, print the Python traceback (not only the one-line error)."
)
# Errors whose message says everything; other types are named in front of their message.
_PLAIN = (ValueError, OSError, RuntimeError, LookupError, TimeoutError, flags.Error)


class _QuietLibraries:
  """Drops INFO lines of orbax and grain (tens per checkpoint); their warnings still show."""

  def filter(self, record) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= 30 or not noisy


def set_up() -> None:
  """INFO verbosity, with orbax's and grain's INFO lines filtered out."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def _innermost(e: BaseException) -> BaseException:
  # ml_collections raises AttributeError(KeyError(message)) for a missing key.
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return e


def error_lines(e: BaseException) -> list[str]:
  """The one-line report of `e` (one line per problem for a multi-line ValueError)."""
  inner = _innermost(e)
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)
  if not isinstance(inner, _PLAIN) or not text:
    text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
  lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
  if len(lines) > 1 and not isinstance(inner, ValueError):
    lines = [" ".join(lines)]  # a library's multi-line message stays on one line
  return lines or [type(inner).__name__]


def flag_error_lines(argv: Sequence[str], e: BaseException) -> list[str]:
  """`error_lines`, with a missing config key named as its --config.KEY=VALUE flag."""
  lines = error_lines(e)
  text = " ".join(lines)
  guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  missing = guess.group(2) if guess else (re.findall(r"'([^']+)'", text) or [None])[0]
  for arg in argv:
    if not arg.startswith("--config.") or missing is None:
      continue
    parts = arg[len("--config.") :].split("=", 1)[0].split(".")
    if missing in parts:
      key = ".".join(parts)
      line = f"{arg}: the config has no key {key}"
      if guess:
        i = parts.index(missing)
        line += f"; did you mean {'.'.join(parts[:i] + [guess.group(1)] + parts[i + 1 :])}?"
      return [line]
  return lines


def _fail(prog: str, lines: list[str], status: int) -> None:
  for line in lines:
    sys.stderr.write(f"{prog}: error: {line}\n")
  sys.stderr.flush()
  sys.exit(status)


def _stray_exception(unraisable) -> None:
  # After a failed orbax read, TensorStore's callbacks for the reads still in flight reach an
  # asyncio loop that is already closed and report "Event loop is closed" as unraisable. They are
  # not the job's error: they go to the log at verbosity 1 (--v=1), not to stderr.
  e = unraisable.exc_value
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
    logging.vlog(1, "".join(traceback.format_exception(type(e), e, unraisable.exc_traceback)))
  else:
    sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str]], None], prog: str, required: Sequence[str] = ()) -> None:
  """`absl.app.run(main)` with one-line failures (see the module docstring).

  Args:
    main: the binary's main(argv).
    prog: the name its error lines start with (e.g. "lct_jax.main").
    required: flags that must be given.
  """
  if required:
    flags.mark_flags_as_required(list(required))

  def parse(argv: list[str]) -> list[str]:
    for arg in argv[1:]:
      # ml_collections defers a missing config file's error to the first read of the flag.
      path = arg.partition("=")[2].partition(":")[0] if arg.startswith("--config=") else None
      if path is not None and not os.path.isfile(path):
        _fail(prog, [f"{arg}: no such config file (relative paths start at {os.getcwd()})"], 2)
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # an unknown key, a config file that fails to load, a bad value
      if "--traceback" in argv:
        raise
      _fail(prog, flag_error_lines(argv, e), 2)

  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except Exception as e:
      if _TRACEBACK.value:
        raise
      logging.flush()
      lines = error_lines(e)
      lines[-1] += " (--traceback shows where)"
      _fail(prog, lines, 1)

  if "--traceback" not in sys.argv:
    sys.unraisablehook = _stray_exception
  app.run(guarded, flags_parser=parse)

"""Runs a lct_jax binary with a pause after every call of one function, for kill tests.

  python tests/pausing.py MODULE:ATTRIBUTE SECONDS BINARY [FLAGS...]

e.g. `lct_jax.io.encoding:_encode_shard 2 lct_jax.encode --config=...` pauses 2 s after each
shard, so that a test can kill the job between two shards. ATTRIBUTE may be a dotted path
(`Scorer.score`).
"""

import functools
import importlib
import runpy
import sys
import time


def main() -> None:
  target, seconds, binary = sys.argv[1], float(sys.argv[2]), sys.argv[3]
  module_name, path = target.split(":")
  *owners, name = path.split(".")
  owner = importlib.import_module(module_name)
  for part in owners:
    owner = getattr(owner, part)
  original = getattr(owner, name)

  @functools.wraps(original)
  def paused(*args, **kwargs):
    out = original(*args, **kwargs)
    time.sleep(seconds)
    return out

  setattr(owner, name, paused)
  sys.argv = [binary, *sys.argv[4:]]
  runpy.run_module(binary, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()

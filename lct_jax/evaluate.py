"""The eval binary: `python -m lct_jax.evaluate --config=<training config> --workdir=DIR`.

Scores the newest checkpoint of the run in DIR (or `--config.eval.checkpoint_step=N`), or with
`--follow` every checkpoint as training writes it, until its final step. Results go to DIR/eval,
with DIR/eval/summary.json (per run: the final checkpoint's FID and the best of the last
eval.best_of_last); rerunning after a kill skips what is finished with the current settings. Flags
are parsed here and nowhere else; the work is `lct_jax.evaluation.evaluate`.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from lct_jax import evaluation
from lct_jax.io import job_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_FOLLOW = flags.DEFINE_bool(
  "follow", False, "Evaluate each new checkpoint as training writes it, until its final step."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  job_logging.set_up()
  results = evaluation.evaluate(_CONFIG.value, _WORKDIR.value, follow=_FOLLOW.value)
  keys = ("step", "run", "fid_label", "fid", "fid_jpeg_q75", "precision", "recall")
  for r in results:
    if r is not None:
      sys.stdout.write(json.dumps({k: r.get(k) for k in keys}) + "\n")


if __name__ == "__main__":
  job_logging.run(main, "lct_jax.evaluate", required=["config", "workdir"])

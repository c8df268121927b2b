"""The training binary: `python -m lct_jax.main --config=configs/ffhq.py --workdir=DIR`.

Rerunning the same command resumes from the newest checkpoint in DIR. Flags are parsed here and
nowhere else; the work is `lct_jax.training.train_and_evaluate`.
"""

from absl import app, flags
from ml_collections import config_flags

from lct_jax import training
from lct_jax.io import job_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  job_logging.set_up()
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  job_logging.run(main, "lct_jax.main", required=["config", "workdir"])

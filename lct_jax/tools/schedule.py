"""`python -m lct_jax.tools.schedule --config=configs/ffhq.py [--json]`: a config's curriculum.

One row per stage: first step, last step, N, c, the largest sigma that receives the diffusion
loss, and the expected fraction of a batch under it. Check a config here before spending a week
of compute.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from lct_jax import config_lib, schema
from lct_jax.core import curriculum
from lct_jax.io import job_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


def schedule(config) -> dict:
  """{"total_steps": K, "stages": [...]} for a validated config (see curriculum.stage_table)."""
  schema.check_train(config)
  cfg = config_lib.curriculum_config(config)
  return {"total_steps": cfg.total_steps, "stages": curriculum.stage_table(cfg)}


def format_table(result: dict) -> str:
  """A fixed-width table of the stages."""
  head = f"{'start_step':>11} {'end_step':>11} {'N':>5} {'c':>10} {'diff_sigma_max':>15} {'diff_fraction':>14}"
  lines = [f"total_steps = {result['total_steps']}", head]
  for r in result["stages"]:
    lines.append(
      f"{r['start_step']:>11} {r['end_step']:>11} {r['N']:>5} {r['c']:>10.6f} "
      f"{r['diff_sigma_max']:>15.4f} {r['diff_fraction']:>14.4f}"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  result = schedule(_CONFIG.value)
  sys.stdout.write((json.dumps(result) if _JSON.value else format_table(result)) + "\n")


if __name__ == "__main__":
  job_logging.run(main, "lct_jax.tools.schedule", required=["config"])

"""The encode job: `python -m lct_jax.encode --config=configs/encode/<name>.py [--config.k=v]`.

Images (a folder or zip of PNG/JPEG, a TFDS dataset, or the embedded MNIST demo) -> autoencoder
posterior moments -> TFDS ArrayRecord shards + latent_stats.json (lct_jax.io.encoding). Rerun the
same command to resume after a crash. For several hosts set --config.distributed=True and start
the same command on every host.
"""

import json

from absl import app, logging
from ml_collections import config_flags

from lct_jax import jobs
from lct_jax.io import encoding, job_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Encode config file.", lock_config=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  job_logging.set_up()
  config = _CONFIG.value
  jobs.setup_job(config, "", "encode")
  summary = encoding.encode_dataset(config)
  logging.info(
    "process %d: read %d images, skipped %d, wrote %d shards (%.1f MB serialized) in %.1f s "
    "(%.1f images/s)",
    summary["process"],
    summary["images_read"],
    summary["images_skipped"],
    summary["shards_written"],
    summary["bytes"] / 1e6,
    summary["seconds"],
    summary["images_per_s"],
  )
  if "dataset" in summary:
    d = summary["dataset"]
    logging.info(
      "dataset %s: %d examples from %d images (%d skipped, see %s), %d shards, %.1f MB serialized",
      summary["output_dir"],
      d["examples_written"],
      d["images_read"],
      d["images_skipped"],
      encoding.SKIPPED_FILENAME,
      d["shards"],
      d["bytes"] / 1e6,
    )
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  job_logging.run(main, "lct_jax.encode", required=["config"])

"""Encode CelebA-HQ at 256x256 with stabilityai/sd-vae-ft-ema (docs/method.md §3.0, §5.2, §9.7).

The authors' code trains on 27,000 CelebA-HQ latents (a hard-coded length; presumably a 27k/3k
split of the 30,000 images): `max_examples = 27000` takes the first 27,000 images in sorted-id
order, and the shards' `id` field records exactly which. `path` is a folder (or zip) of the
images, e.g. the common `celeba_hq_256` folder; for TFDS's manual-download dataset use
--config.source=tfds --config.tfds_name=celeb_a_hq/256 instead. No flips.
Keys: see lct_jax/io/encode_config.py.

  python -m lct_jax.encode --config=configs/encode/celebahq.py --config.path=/data/celeba_hq_256
"""

import os

from lct_jax.io import encode_config


def get_config():
  """CelebA-HQ, 256px, SD VAE (ft-EMA), first 27,000 images, no flips."""
  config = encode_config.get_base_config()
  config.source = "folder"
  config.path = os.path.join(encode_config.DATA_ROOT, "images", "celeba_hq_256")
  config.resolution = 256
  config.autoencoder = "stabilityai/sd-vae-ft-ema"
  config.flip = False
  config.max_examples = 27_000
  config.output_dir = encode_config.default_output_dir("celebahq_256_sd-vae-ft-ema")
  config.shard_size = 1000
  config.batch_size = 64
  return config

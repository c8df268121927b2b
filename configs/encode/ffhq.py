"""Encode FFHQ (70,000 faces) at 256x256 with stabilityai/sd-vae-ft-ema (docs/method.md §3.0,
§5.2).

FFHQ is not in the TFDS catalog: point `path` at a folder (or zip) of the images (the 1024x1024
PNGs are resized to 256 here; a 256x256 copy is used as is). No flips (Table 1 trains on 70,000
latents). Keys: see lct_jax/io/encode_config.py.

  python -m lct_jax.encode --config=configs/encode/ffhq.py --config.path=/data/ffhq/images1024x1024
"""

import os

from lct_jax.io import encode_config


def get_config():
  """FFHQ, 256px, SD VAE (ft-EMA), all 70,000 images, no flips."""
  config = encode_config.get_base_config()
  config.source = "folder"
  config.path = os.path.join(encode_config.DATA_ROOT, "images", "ffhq")
  config.resolution = 256
  config.autoencoder = "stabilityai/sd-vae-ft-ema"
  config.flip = False
  config.max_examples = -1
  config.output_dir = encode_config.default_output_dir("ffhq_256_sd-vae-ft-ema")
  config.shard_size = 1000  # 70 shards
  config.batch_size = 64
  return config

"""Encode LSUN Church (outdoor) at 256x256 with stabilityai/sd-vae-ft-ema, with h-flipped copies.

Paper (docs/method.md §5.2, §9.8): 120,000 images plus their flipped copies = 240,000 training
latents, so `flip = True` and `max_examples = 120000` (TFDS's train split has 126,227; set -1
for all).
Source: TFDS `lsun/church_outdoor` (download it on a machine with network access with
--config.tfds_download=True, or copy a prepared TFDS data_dir and set tfds_data_dir). LSUN images
are not square: shorter side resized to 256, centre crop. Keys: see lct_jax/io/encode_config.py.

  python -m lct_jax.encode --config=configs/encode/lsun_church.py --config.tfds_data_dir=/data/tfds
"""

from lct_jax.io import encode_config


def get_config():
  """LSUN Church outdoor, 256px, SD VAE (ft-EMA), 120,000 images + flips."""
  config = encode_config.get_base_config()
  config.source = "tfds"
  config.tfds_name = "lsun/church_outdoor"
  config.split = "train"
  config.resolution = 256
  config.autoencoder = "stabilityai/sd-vae-ft-ema"
  config.flip = True
  config.max_examples = 120_000
  config.output_dir = encode_config.default_output_dir("lsun_church_256_sd-vae-ft-ema_flip")
  config.shard_size = 1000
  config.batch_size = 64
  return config

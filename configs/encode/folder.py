"""Encode any folder (recursive) or .zip of PNG/JPEG images with the paper's VAE.

Keys (all in lct_jax/io/encode_config.py): source ("folder" or "zip"), path (required),
labels_from_subdirs, max_examples, resolution (256: shorter side resize + centre crop),
autoencoder (HF id, local VAE folder, "pixel", "pixel:F", "gray", "gray:F"), flip, output_dir,
shard_size, batch_size, num_workers, max_bad_fraction, and the multi-host keys.

  python -m lct_jax.encode --config=configs/encode/folder.py --config.path=/data/images \
      --config.output_dir=/data/latents/mine
"""

from lct_jax.io import encode_config


def get_config():
  """A folder of images at 256x256 through stabilityai/sd-vae-ft-ema."""
  config = encode_config.get_base_config()
  config.source = "folder"
  config.path = ""  # required: --config.path=DIR (or a .zip with --config.source=zip)
  config.resolution = 256
  config.autoencoder = "stabilityai/sd-vae-ft-ema"
  config.flip = False
  config.output_dir = encode_config.default_output_dir("folder_256_sd-vae-ft-ema")
  return config

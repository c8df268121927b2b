"""The paper's Fig. 1: outliers of latent vs pixel values, and of TD values given a checkpoint.

Encode the same images twice, once with the VAE and once with the pixel autoencoder, e.g.

  python -m lct_jax.encode --config=configs/encode/celebahq.py
  python -m lct_jax.encode --config=configs/encode/celebahq.py --config.autoencoder=pixel \
      --config.output_dir=$LCT_DATA_DIR/latents/celebahq_256_pixel
  python -m lct_jax.analyze --config=configs/analyze/fig1.py

Keys:
  latent_dir    latent dataset (VAE latents)
  pixel_dir     the same images through the `pixel` autoencoder ("" = latent side only)
  output_dir    where outliers.json / outliers.png go ("" = latent_dir/analysis)
  max_examples  evenly spaced examples to analyze (-1 = all; pixel data is 48x larger)
  use_flipped   normalize with the statistics over originals + flips
  sigma_data    target std of the normalization (0.5)
  checkpoint    a training workdir: TD statistics of its EMA consistency function ("" = none)
  checkpoint_step  which checkpoint (-1 = newest)
  num_scales    N of the Karras grid for TD statistics (paper: 21)
  td_examples   latents used for the TD statistics
  seed          noise seed of the TD statistics
"""

import ml_collections

from lct_jax.io import encode_config


def get_config():
  """Fig. 1 on CelebA-HQ latents vs pixels."""
  c = ml_collections.ConfigDict()
  c.latent_dir = encode_config.default_output_dir("celebahq_256_sd-vae-ft-ema")
  c.pixel_dir = encode_config.default_output_dir("celebahq_256_pixel")
  c.output_dir = ""
  c.max_examples = 500
  c.use_flipped = False
  c.sigma_data = 0.5
  c.checkpoint = ""
  c.checkpoint_step = -1
  c.num_scales = 21
  c.td_examples = 256
  c.seed = 0
  return c

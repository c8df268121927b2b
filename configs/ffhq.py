"""FFHQ 256x256 (latents 32x32x4): Table 1 of the paper, 1.4K epochs at global batch 128.

K = floor(70,000 / 128) * 1400 = 764,400 steps, 7 curriculum stages of 109,200.
"""

from configs import default
from configs.encode import ffhq as encode


def get_config():
  config = default.get_config()
  config.data.dir = encode.get_config().output_dir  # where configs/encode/ffhq.py writes
  config.data.num_examples = 70_000
  config.train.global_batch_size = 128
  config.train.num_epochs = 1400
  return config

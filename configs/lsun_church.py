"""LSUN Church 256x256 (latents 32x32x4): Table 1, 1.8K epochs at global batch 256.

The authors' code trains on 120,000 images plus their stored horizontal flips (240,000 latents):
K = floor(240,000 / 256) * 1800 = 1,686,600 steps (docs/method.md section 9 item 8).
"""

from configs import default
from configs.encode import lsun_church as encode


def get_config():
  config = default.get_config()
  config.data.dir = encode.get_config().output_dir  # where configs/encode/lsun_church.py writes
  config.data.num_examples = 240_000
  config.data.use_flipped = True
  config.train.global_batch_size = 256
  config.train.num_epochs = 1800
  return config

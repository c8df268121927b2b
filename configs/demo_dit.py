"""The class-conditional demo: a small DiT on the 5,000 MNIST digits and their labels, 2-core CPU.

Data, schedule and scoring are the demo's, at 2,000 steps of 32 (configs/demo.py: 16x16x4 `gray:2`
latents, the paper's five changes, 1- and 2-NFE FID on 1,000 samples against the 5,000 digits).
The network is a DiT of our own size, "128x4x4/2" (hidden 128, 4 blocks, 4 heads, patch 2: 64
tokens, 0.86M parameters), conditioned on the digit's class with label dropout 0.1; samples are
drawn class by class (sample i is digit i mod 10) and the grids have one row per digit. The
learning rate is half the UNet demo's (5e-4): our choice for a transformer, not tuned.

  python -m lct_jax.main --config=configs/demo_dit.py --workdir=runs/demo_dit
"""

from configs import demo


def get_config():
  # 2,000 steps of 32, the run its README figures describe (configs/demo.py trains 8,000 of 8).
  config = demo.get_config_2000_steps_of_32()
  config.model.name = "dit"
  config.model.dit_size = "128x4x4/2"
  config.model.label_dropout = 0.1
  config.data.num_classes = 10
  config.optim.learning_rate = 5e-4
  config.train.num_grid_samples = 80  # 8 per digit
  config.eval.grid_samples = 100  # 10 per digit, one row each
  return config

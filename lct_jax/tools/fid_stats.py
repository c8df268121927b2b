"""`python -m lct_jax.tools.fid_stats --images=DIR_or_ZIP --out=stats.npz [--features_out=f.npz]`.

Reference FID statistics of a set of real images. The images are one of:

* every image under a folder (recursively) or in a .zip, in sorted path order, decoded with PIL
  and converted to RGB as pytorch-fid does;
* the images of a TFDS dataset already prepared on local disk (`--tfds=name:split`);
* a latent dataset of the encode job decoded by its own autoencoder (`--latents=DATA_DIR`). These
  are the stored posterior means: with a VAE they are reconstructions, with the `pixel`
  autoencoders the exact images.

Images go through the Flax FID Inception (`lct_jax.fid.inception`) in fixed-size batches split
over the local devices; features accumulate into float64 sums (`lct_jax.fid.stats`). The output
records the weights hash, the preprocessing, the image size and the number of images, so that the
evaluation refuses to compare it with statistics made differently.

`--features_out` also keeps every feature vector (float32 (N, d), key `features`, with the same
kind of metadata) for precision/recall (the eval job's `eval.reference_features`). They are
Inception's 2048-d pool3 features, or, with `--pr_features=vgg16 --vgg16_weights=vgg16.npz`,
VGG16's 4096-d fc2 features (the paper's; `lct_jax.fid.vgg`), computed in the same pass as the
Inception statistics. The file records the extractor, its weights hash and preprocessing (for
VGG16 the resize mode). The eval job refuses features made by another extractor or weights than
its own `eval.pr_features`.

`--mirror` adds each image's horizontal mirror (the StyleGAN2-ADA toolbox's real set for
pr50k3_full).
"""

import io
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator

import numpy as np
from absl import app, flags
from PIL import Image

from lct_jax.fid import reference
from lct_jax.io import image_sources, job_logging

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def list_images(path: str) -> list[str]:
  """Sorted image paths under a folder (recursive) or member names of a .zip, listed as the encode
  job lists them (`image_sources.list_folder`: hidden files and `__MACOSX` left out).

  Args:
    path: a folder or a .zip file.

  Returns:
    Paths (folder) or member names (zip) with an image extension, sorted.
  """
  if os.path.isdir(path):
    found = [os.path.join(path, rel) for rel in image_sources.list_folder(path, IMAGE_EXTENSIONS)]
  elif zipfile.is_zipfile(path):
    found = image_sources.list_zip(path, IMAGE_EXTENSIONS)
  else:
    raise FileNotFoundError(f"--images={path} is neither a folder nor a .zip file")
  if not found:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
  return found


def _decode(data: bytes | str) -> np.ndarray:
  """One image file (path or bytes) -> uint8 (H, W, 3), converted to RGB like pytorch-fid (16-bit
  grayscale scaled to 8 bits, as the encode job does)."""
  src = io.BytesIO(data) if isinstance(data, bytes) else data
  with Image.open(src) as img:
    return np.asarray(image_sources.to_rgb(img), np.uint8)


def read_images(path: str, max_images: int = 0, threads: int = 4) -> Iterator[np.ndarray]:
  """Decoded images of a folder or .zip in `list_images` order (decoded in parallel threads)."""
  names = list_images(path)
  if max_images > 0:
    names = names[:max_images]
  if os.path.isdir(path):  # at most ~2 windows of decoded images wait for the consumer
    yield from image_sources.bounded_map(_decode, names, threads, window=16 * threads)
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


def read_latent_images(
  folder: str,
  autoencoder: str | None = None,
  batch_size: int = 64,
  max_images: int = 0,
  use_flipped: bool = False,
) -> Iterator[np.ndarray]:
  """Images of an encode-job latent dataset: its posterior means decoded by its autoencoder.

  Args:
    folder: the dataset folder (training's data.dir).
    autoencoder: name to load; default the one recorded in its latent_stats.json. Its weights
      hash must match the recorded one.
    batch_size: latents per decode call (padded: one compile).
    max_images: stop after this many (0: all).
    use_flipped: also the stored h-flipped copies (after all originals).

  Yields:
    uint8 (H, W, 3) images in dataset order.
  """
  from lct_jax.io import autoencoder as ae_lib
  from lct_jax.io import latent_dataset, latents

  recorded = latents.load_latent_stats(folder)
  ae = ae_lib.load_autoencoder(autoencoder or recorded.autoencoder)
  latents.check_compatible(recorded, autoencoder=ae)
  source = latent_dataset.LatentMomentsSource(folder, use_flipped=use_flipped)
  n = len(source) if max_images <= 0 else min(len(source), max_images)
  for start in range(0, n, batch_size):
    z = np.stack([source[i]["mean"] for i in range(start, min(n, start + batch_size))])
    count = len(z)
    if count < batch_size:
      z = np.concatenate([z, np.zeros((batch_size - count, *z.shape[1:]), z.dtype)])
    yield from np.asarray(ae.decode(z))[:count]


def mirrored(images: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
  """Each image followed by its horizontal mirror."""
  for image in images:
    yield image
    yield np.ascontiguousarray(image[:, ::-1])


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
  flags.DEFINE_string(
    "latents", None, "Latent dataset folder (the encode job's output), decoded by its autoencoder."
  )
  flags.DEFINE_string(
    "autoencoder", None, "--latents: autoencoder to decode with (default: the recorded one)."
  )
  flags.DEFINE_bool("latents_flipped", False, "--latents: also the stored h-flipped copies.")
  flags.DEFINE_bool("mirror", False, "Add each image's horizontal mirror (2N images).")
  flags.DEFINE_string("out", None, "Output statistics .npz.")
  flags.DEFINE_string(
    "features_out", None, "Also write all features (N, d) here, for precision/recall."
  )
  flags.DEFINE_enum(
    "pr_features",
    "inception",
    list(reference.PR_FEATURES),
    "Network of the --features_out vectors: Inception pool3 (2048-d) or VGG16 fc2 (4096-d, the "
    "paper's; needs --vgg16_weights). Match the eval job's eval.pr_features.",
  )
  flags.DEFINE_string(
    "vgg16_weights", None, "--pr_features=vgg16: converted VGG16 .npz (convert_vgg16)."
  )
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
  if f.pr_features == "vgg16" and not (f.features_out and f.vgg16_weights):
    raise app.UsageError("--pr_features=vgg16 needs --features_out and --vgg16_weights")
  if f.images:
    source = os.path.abspath(f.images)
    images = read_images(source, f.max_images)
  elif f.latents:
    source = f"latents:{os.path.abspath(f.latents)}" + (" (+flipped)" if f.latents_flipped else "")
    images = read_latent_images(
      f.latents, f.autoencoder, f.batch_size, f.max_images, f.latents_flipped
    )
  else:
    source = f"tfds:{f.tfds}"
    images = read_tfds_images(f.tfds, f.tfds_data_dir, f.image_key, f.max_images)
  if f.mirror:
    source += " (+mirrored)"
    images = mirrored(images)
  meta = reference.compute_reference_stats(
    f.out,
    images,
    source,
    f.weights,
    f.batch_size,
    f.features_out,
    f.pr_features,
    f.vgg16_weights,
  )
  sys.stdout.write(json.dumps({"out": os.path.abspath(f.out), **meta.to_dict()}) + "\n")


if __name__ == "__main__":
  define_flags()
  job_logging.run(main, "lct_jax.tools.fid_stats")

"""Reference statistics of real images: streamed features, FID statistics and kept features.

This module turns a stream of real uint8 images into what the eval job compares against:

* the FID Inception's float64 feature sums, saved as statistics (`stats.save_stats`);
* optionally every feature vector for precision/recall (`stats.save_features`): Inception's pool3
  features, or VGG16's fc2 features (`vgg`) computed in the same pass.

Batches are padded to a fixed size (one compile per image size) and split over the local devices.
Progress (images done, img/s) is shown as the encode job shows it.
"""

from collections.abc import Iterable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from lct_jax.fid import inception, stats, vgg

PR_FEATURES = (inception.EXTRACTOR, vgg.EXTRACTOR)


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
  model: inception.FidInception,
  images: Iterable[np.ndarray],
  batch_size: int = 64,
  features_out: list[np.ndarray] | None = None,
  pr_model: vgg.Vgg16Features | None = None,
  total: int | None = None,
) -> tuple[stats.FeatureStats, str]:
  """Streams images through the FID Inception into float64 feature sums.

  Batches are padded to `batch_size` (one compile per image size) and, when `batch_size` divides
  evenly, split over all local devices.

  Args:
    model: loaded weights.
    images: uint8 (H, W, 3) arrays.
    batch_size: images per forward pass.
    features_out: if given, each batch's float32 features are appended to it: the Inception
      features, or `pr_model`'s when given.
    pr_model: another network (VGG16) whose features go to `features_out`.
    total: the number of images, when known (for the progress bar).

  Returns:
    (Inception statistics, image size "HxW" or "mixed").
  """
  devices = jax.local_devices()
  sharding = None
  if batch_size % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sums = stats.FeatureStats.zeros(inception.FEATURE_DIM)
  sizes = set()
  with tqdm(total=total, unit="img", desc="FID reference", mininterval=5.0) as progress:
    for batch in _batches(images, batch_size):
      n = len(batch)
      sizes.add(f"{batch.shape[1]}x{batch.shape[2]}")
      if n < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)])
      x = jax.device_put(batch, sharding) if sharding is not None else batch
      features = np.asarray(model.features(x))[:n]
      sums.update(features)
      if features_out is not None:
        kept = features if pr_model is None else np.asarray(pr_model.features(x))[:n]
        features_out.append(kept)
      progress.update(n)
  if sums.count == 0:
    raise ValueError("no images were read")
  return sums, sizes.pop() if len(sizes) == 1 else "mixed"


def compute_reference_stats(
  out: str,
  images: Iterable[np.ndarray],
  source: str,
  weights: str | None = None,
  batch_size: int = 64,
  features_out: str | None = None,
  pr_features: str = "inception",
  vgg16_weights: str | None = None,
  total: int | None = None,
) -> stats.StatsMeta:
  """Computes and saves (atomically) the statistics of `images`; returns their metadata.

  Args:
    out: destination statistics .npz.
    images: uint8 (H, W, 3) arrays.
    source: free-text provenance recorded in the metadata.
    weights: converted Inception .npz (default path if None).
    batch_size: images per forward pass.
    features_out: also write every feature vector there (`stats.save_features`), for
      precision/recall.
    pr_features: which network makes the `features_out` vectors: "inception" or "vgg16".
    vgg16_weights: converted VGG16 .npz (`python -m lct_jax.tools.convert_vgg16`), for "vgg16".
    total: the number of images, when known (for the progress bar).

  Returns:
    The statistics' metadata.
  """
  if pr_features not in PR_FEATURES:
    raise ValueError(f"pr_features={pr_features!r}: expected one of {PR_FEATURES}")
  if pr_features == "vgg16" and not (features_out and vgg16_weights):
    raise ValueError("pr_features='vgg16' needs features_out and vgg16_weights")
  model = inception.load_inception(weights)
  pr_model = vgg.load_vgg16(vgg16_weights) if pr_features == "vgg16" else None
  kept: list[np.ndarray] | None = [] if features_out else None
  sums, image_size = accumulate_statistics(model, images, batch_size, kept, pr_model, total)
  meta = model.stats_meta(image_size, sums.count, source)
  # Features first: a run that finds the statistics file takes the pair as complete.
  if features_out:
    feats_meta = (pr_model or model).stats_meta(image_size, sums.count, source)
    stats.save_features(features_out, np.concatenate(kept), feats_meta)
  stats.save_stats(out, sums, meta)
  return meta

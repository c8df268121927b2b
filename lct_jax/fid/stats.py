"""Feature statistics for FID: streaming float64 sums, their files, and the Fréchet distance.

`FeatureStats` keeps (count, Σf, Σffᵀ) in float64, so batches, hosts and resumed runs merge
exactly by addition. Mean and covariance (np.cov's unbiased N-1 form) are derived at the end.

Statistics files are .npz archives with pytorch-fid's keys (`mu`, `sigma`, usable by pytorch-fid
directly), plus the sums and a metadata record: the feature extractor, the content hash of its
weights, the preprocessing, the image size and the number of images. `check_compatible` refuses
to compare statistics made with a different extractor, weights or preprocessing. Feature files
(every vector, for precision/recall: Inception's or VGG16's) carry the same record.

`frechet_distance` follows pytorch-fid's numerics exactly: scipy sqrtm, the 1e-6 diagonal offset
when the product is singular, the imaginary-part check.
"""

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.linalg

from lct_jax.fid import npz_io

FID50K_SAMPLES = 50_000


class IncompatibleStatsError(ValueError):
  """Two statistics were made with different extractors, weights, preprocessing or feature size."""


@dataclasses.dataclass
class FeatureStats:
  """Streaming sums of feature vectors in float64: count, Σf (d,), Σffᵀ (d, d).

  Attributes:
    count: number of feature vectors added.
    feature_sum: Σf, float64 (d,).
    outer_sum: Σffᵀ, float64 (d, d).
  """

  count: int
  feature_sum: np.ndarray
  outer_sum: np.ndarray

  @classmethod
  def zeros(cls, dim: int) -> "FeatureStats":
    """Empty statistics for `dim`-dimensional features."""
    return cls(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))

  @classmethod
  def from_features(cls, features: np.ndarray) -> "FeatureStats":
    """Statistics of a (N, d) feature array."""
    stats = cls.zeros(np.shape(features)[1])
    stats.update(features)
    return stats

  @property
  def dim(self) -> int:
    return int(self.feature_sum.shape[0])

  def update(self, features: np.ndarray) -> "FeatureStats":
    """Adds a (N, d) batch in place (converted to float64 first) and returns self."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"expected features (N, {self.dim}), got {f.shape}")
    self.count += int(f.shape[0])
    self.feature_sum += f.sum(axis=0)
    self.outer_sum += f.T @ f
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """The statistics of the union of both sets (a new object)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge {self.dim}-d and {other.dim}-d statistics")
    return FeatureStats(
      self.count + other.count,
      self.feature_sum + other.feature_sum,
      self.outer_sum + other.outer_sum,
    )

  def mean(self) -> np.ndarray:
    """Mean feature, float64 (d,)."""
    if self.count < 1:
      raise ValueError("no features were added")
    return self.feature_sum / self.count

  def cov(self) -> np.ndarray:
    """Unbiased covariance (divides by N-1, as np.cov), float64 (d, d), symmetrised."""
    if self.count < 2:
      raise ValueError(f"covariance needs at least 2 features, got {self.count}")
    mu = self.mean()
    c = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
    return (c + c.T) / 2


def allgather_merge(stats: FeatureStats) -> FeatureStats:
  """Merges every process's statistics (multi-host); every process gets the total.

  The float64 sums travel bit for bit (as uint32 words), so the result does not depend on
  jax_enable_x64 and equals merging the per-host objects on one machine.

  Args:
    stats: this process's statistics (same dimension on every process).

  Returns:
    The merged statistics (the input itself when there is one process).
  """
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return stats
  words = np.concatenate(
    [
      np.asarray([stats.count], np.float64),
      stats.feature_sum,
      stats.outer_sum.ravel(),
    ]
  ).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words, tiled=False))
  d = stats.dim
  total = FeatureStats.zeros(d)
  for row in gathered:
    values = np.ascontiguousarray(row, np.uint32).view(np.float64)
    part = FeatureStats(int(values[0]), values[1 : 1 + d].copy(), values[1 + d :].reshape(d, d))
    total = total.merge(part)
  return total


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

  d² = |mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)). When the matrix square root
  is not finite, eps is added to both diagonals and it is retried; a small imaginary part from
  rounding is dropped, a large one (|imag| of the diagonal > 1e-3) raises.

  Args:
    mu1, sigma1: mean (d,) and covariance (d, d) of the first set.
    mu2, sigma2: the same for the second set.
    eps: diagonal offset used only when the product is singular.

  Returns:
    The distance as a Python float.

  Raises:
    ValueError: shapes differ, or the square root has a significant imaginary part.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"shapes differ: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular product; adding %s to the diagonal of both covariances", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm has imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_label(num_samples: int) -> str:
  """The metric's name for a sample count: "fid50k" only for exactly 50,000 samples.

  Args:
    num_samples: generated images behind the statistic.

  Returns:
    "fid50k", "fid10k", "fid2500", ... (thousands when divisible, else the exact count).
  """
  if num_samples <= 0:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  if num_samples % 1000 == 0:
    return f"fid{num_samples // 1000}k"
  return f"fid{num_samples}"


# ----------------------------------------------------------------------------------------------
# Metadata and files.


@dataclasses.dataclass(frozen=True)
class StatsMeta:
  """What a statistics or features file was made from.

  Attributes:
    weights_sha256: content hash of the extractor's weights (`FidInception.weights_sha256`).
    preprocessing: the input pipeline (`preprocess.PREPROCESSING`; for VGG16 it names the resize
      mode).
    feature_dim: feature size (2048 for Inception pool3, 4096 for VGG16 fc2).
    image_size: "HxW" of the images before the resize, or "mixed".
    num_images: number of images.
    source: free text: folder, dataset or run the images came from.
    extractor: the network, "inception" or "vgg16" (a file without the field reads as
      "inception").
  """

  weights_sha256: str
  preprocessing: str
  feature_dim: int
  image_size: str
  num_images: int
  source: str = ""
  extractor: str = "inception"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "StatsMeta":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# image_size values that say nothing about the size: unrecorded, or images of several sizes.
UNKNOWN_SIZES = ("", "mixed")


def check_compatible(a: StatsMeta | None, b: StatsMeta | None, allow_unverified: bool = False):
  """Refuses to compare statistics made with different extractors, weights, preprocessing or size.

  Args:
    a, b: the two statistics' metadata; None for a foreign file without metadata (e.g. a
      pytorch-fid .npz).
    allow_unverified: accept a None (foreign) side; its provenance cannot be checked.

  The image sizes are compared when both are recorded (not "" or "mixed").

  Raises:
    IncompatibleStatsError: naming the fields that differ.
  """
  if a is None or b is None:
    if allow_unverified:
      return
    raise IncompatibleStatsError(
      "statistics without metadata (made by another tool?) cannot be checked for matching "
      "weights and preprocessing; recompute them with `python -m lct_jax.tools.fid_stats` or "
      "pass allow_unverified=True"
    )
  names = ["extractor", "weights_sha256", "preprocessing", "feature_dim"]
  if all(size not in UNKNOWN_SIZES for size in (a.image_size, b.image_size)):
    names.append("image_size")
  problems = [
    f"{name}: {getattr(a, name)!r} vs {getattr(b, name)!r}"
    for name in names
    if getattr(a, name) != getattr(b, name)
  ]
  if problems:
    raise IncompatibleStatsError("statistics are not comparable: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class LoadedStats:
  """A statistics file: mean, covariance, metadata (None if foreign), sums (None if foreign)."""

  mu: np.ndarray
  sigma: np.ndarray
  meta: StatsMeta | None
  sums: FeatureStats | None


def save_stats(path: str, stats: FeatureStats, meta: StatsMeta) -> None:
  """Writes statistics atomically: mu, sigma (pytorch-fid keys), the sums and the metadata.

  Args:
    path: destination .npz (written exactly there).
    stats: the sums; meta.num_images must equal stats.count.
    meta: provenance.
  """
  if meta.num_images != stats.count or meta.feature_dim != stats.dim:
    raise ValueError(
      f"meta says {meta.num_images} images of {meta.feature_dim}-d features, stats hold "
      f"{stats.count} of {stats.dim}-d"
    )
  arrays = {
    "mu": stats.mean(),
    "sigma": stats.cov(),
    "count": np.asarray(stats.count, np.int64),
    "feature_sum": stats.feature_sum,
    "outer_sum": stats.outer_sum,
  }
  npz_io.save_npz_atomic(path, arrays, {"kind": "lct_jax fid stats", **meta.to_dict()})


def load_stats(path: str) -> LoadedStats:
  """Reads a statistics file written by `save_stats`, or a foreign one with just mu and sigma."""
  data, raw = npz_io.read_npz(path)
  if "mu" not in data or "sigma" not in data:
    raise ValueError(
      f"{path} has no 'mu' and 'sigma' arrays (write it with lct_jax.tools.fid_stats)"
    )
  mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  sums = None
  if "outer_sum" in data:
    sums = FeatureStats(int(data["count"]), data["feature_sum"], data["outer_sum"])
  return LoadedStats(mu, sigma, StatsMeta.from_dict(raw) if raw else None, sums)


def fid_between(a: LoadedStats, b: LoadedStats, allow_unverified: bool = False) -> float:
  """FID between two loaded statistics after `check_compatible`."""
  check_compatible(a.meta, b.meta, allow_unverified=allow_unverified)
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def save_features(path: str, features: np.ndarray, meta: StatsMeta) -> None:
  """Writes features (float32 (N, d), key `features`) with their metadata atomically."""
  if meta.num_images != len(features) or meta.feature_dim != features.shape[1]:
    raise ValueError(f"meta says {meta.num_images} x {meta.feature_dim}, got {features.shape}")
  npz_io.save_npz_atomic(
    path,
    {"features": np.asarray(features, np.float32)},
    {"kind": "lct_jax fid features", **meta.to_dict()},
  )


def load_features(path: str) -> tuple[np.ndarray, StatsMeta | None]:
  """Reads a `save_features` file: (float32 (N, d) features, metadata or None if foreign)."""
  data, raw = npz_io.read_npz(path)
  if "features" not in data:
    raise ValueError(f"{path} has no 'features' array (write it with fid_stats --features_out)")
  return np.asarray(data["features"], np.float32), StatsMeta.from_dict(raw) if raw else None

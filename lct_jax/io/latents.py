"""Dataset-level latent statistics and the normalization of docs/method.md §3.0, in one place.

What the statistics are computed over (docs/method.md §3.0 and §9.16):

* the latents training reads, in raw VAE scale (no 0.18215 factor);
* per ELEMENT of the (H, W, C) latent, over every stored example;
* with the unbiased std (ddof = 1, as torch.std_mean).

The encode job stores, per image, the posterior mean and std and ONE frozen posterior draw (the
paper's code caches one draw per image). It writes two sets of statistics:

* over the draws: the default, `data.latent = "sample"`;
* over the means: `data.latent = "mean"`, also used by `"fresh"` (a new draw each step).

When the dataset stores h-flipped copies, a second copy of each set is computed over originals +
flips (the paper's LSUN training set); training with `data.use_flipped` picks that one.

  x      = (z_raw - mean) / std * sigma_data           (normalize; sigma_data = 0.5)
  z_raw  = x / sigma_data * std + mean                  (denormalize, before VAE decoding)

The VAE scale factor cancels in this formula, so it is recorded in `latent_stats.json` but never
applied. Elements whose std is ~0 (constant pixels, e.g. MNIST borders in pixel space) use
`std_floor` instead, so they map to 0 rather than to inf/nan.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lct_jax.io import autoencoder as ae_lib

STATS_FILENAME = "latent_stats.json"
FORMAT = "lct_jax/latent_stats/v1"
DEFAULT_STD_FLOOR = 1e-6
# data.normalization: standardize each element of the latent (docs/method.md §3.0, the paper's),
# or each channel as a whole (pixel-space data, whose rarely-inked border pixels per-element
# standardization turns into outliers of up to 70 sigma_data on the MNIST demo digits).
NORMALIZATIONS = ("element", "channel")


class IncompatibleLatentsError(ValueError):
  """The latent dataset was made with another autoencoder or resolution than the config's."""


@dataclasses.dataclass(frozen=True)
class LatentStats:
  """Per-element statistics of a latent dataset, and what produced it.

  Attributes:
    mean: float64 (H, W, C), per-element mean of the raw-scale latents (posterior means or
      frozen draws).
    std: float64 (H, W, C), per-element unbiased std.
    channel_mean: per-channel mean over examples and positions (for reports).
    channel_std: per-channel unbiased std over examples and positions.
    num_latents: how many latents the figures are over.
    includes_flipped: whether the h-flipped copies are among them.
    autoencoder: identity of the autoencoder (HF id, absolute folder path, "pixel", "pixel:F").
    weights_hash: sha256 of its parameters.
    resolution: image side length the latents were encoded from.
    scale_factor: the VAE's scale factor (recorded only, see the module docstring).
    std_floor: lower bound on std used by `normalize` / `denormalize`.
  """

  mean: np.ndarray
  std: np.ndarray
  channel_mean: tuple[float, ...]
  channel_std: tuple[float, ...]
  num_latents: int
  includes_flipped: bool
  autoencoder: str
  weights_hash: str
  resolution: int
  scale_factor: float
  std_floor: float = DEFAULT_STD_FLOOR

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return tuple(self.mean.shape)

  @property
  def effective_std(self) -> np.ndarray:
    """max(std, std_floor): the divisor of `normalize`."""
    return np.maximum(self.std, self.std_floor)


class MomentAccumulator:
  """Streaming float64 per-element count, mean and sum of squared deviations (Chan et al.).

  Merging accumulators of disjoint parts gives the same result (to float64 rounding) as one pass
  over everything, so shards can be summarized independently and combined.
  """

  def __init__(self, shape: tuple[int, ...]):
    self.count = 0
    self.mean = np.zeros(shape, np.float64)
    self.m2 = np.zeros(shape, np.float64)

  def update(self, batch: np.ndarray) -> None:
    """Adds a batch (B, *shape)."""
    batch = np.asarray(batch, np.float64)
    if batch.shape[0] == 0:
      return
    other = MomentAccumulator(self.mean.shape)
    other.count = batch.shape[0]
    other.mean = batch.mean(axis=0)
    other.m2 = ((batch - other.mean) ** 2).sum(axis=0)
    self.merge(other)

  def merge(self, other: MomentAccumulator) -> None:
    """Adds the examples summarized by `other`."""
    if other.count == 0:
      return
    n = self.count + other.count
    delta = other.mean - self.mean
    self.mean = self.mean + delta * (other.count / n)
    self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
    self.count = n

  def finalize(self) -> dict[str, Any]:
    """Returns mean, std (ddof=1), channel_mean, channel_std (ddof=1) and num_latents."""
    if self.count < 2:
      raise ValueError(f"need at least 2 latents for an unbiased std, got {self.count}")
    std = np.sqrt(self.m2 / (self.count - 1))
    axes = tuple(range(self.mean.ndim - 1))
    positions = int(np.prod(self.mean.shape[:-1]))
    ch_mean = self.mean.mean(axis=axes)
    ch_m2 = self.m2.sum(axis=axes) + self.count * ((self.mean - ch_mean) ** 2).sum(axis=axes)
    ch_std = np.sqrt(ch_m2 / (self.count * positions - 1))
    return dict(
      mean=self.mean,
      std=std,
      channel_mean=tuple(float(v) for v in ch_mean),
      channel_std=tuple(float(v) for v in ch_std),
      num_latents=int(self.count),
    )


def _stats_block(stats: LatentStats) -> dict[str, Any]:
  return {
    "num_latents": stats.num_latents,
    "includes_flipped": stats.includes_flipped,
    "channel_mean": list(stats.channel_mean),
    "channel_std": list(stats.channel_std),
    "mean": np.asarray(stats.mean, np.float64).tolist(),
    "std": np.asarray(stats.std, np.float64).tolist(),
  }


# The stored fields statistics are computed over, and which of them each `data.latent` mode
# normalizes with: the frozen draw with the draws' statistics, the mean with the means'. A fresh
# draw per step uses the means' statistics: its draws' statistics differ from them by the
# posterior std only, and a dataset without stored draws has no others.
STATS_FIELDS = ("mean", "sample")
LATENT_MODES = {"sample": "sample", "mean": "mean", "fresh": "mean"}


def _block_key(field: str, flipped: bool) -> str:
  """The JSON block of a field's statistics ("originals" / "with_flipped" hold the means')."""
  return ("" if field == "mean" else field + "_") + ("with_flipped" if flipped else "originals")


def save_latent_stats(path: str, blocks: Mapping[tuple[str, bool], LatentStats]) -> None:
  """Writes `latent_stats.json` atomically (temporary file, then rename).

  Args:
    path: the JSON file, or a folder (the file is then `folder/latent_stats.json`).
    blocks: (field, over originals + flipped copies) -> statistics, for field in STATS_FIELDS;
      ("mean", False) is required, every block has the same metadata.
  """
  if os.path.isdir(path):
    path = os.path.join(path, STATS_FILENAME)
  stats = blocks["mean", False]
  doc = {
    "format": FORMAT,
    "autoencoder": stats.autoencoder,
    "weights_hash": stats.weights_hash,
    "resolution": stats.resolution,
    "scale_factor": stats.scale_factor,
    "latent_shape": list(stats.latent_shape),
    "layout": "(H, W, C) per element, raw VAE scale",
    "computed_over": "originals/with_flipped: the stored posterior means; sample_*: the stored "
    "frozen posterior draws; unbiased std (ddof=1)",
    "std_floor": stats.std_floor,
  }
  for (field, flipped), block in blocks.items():
    if field not in STATS_FIELDS:
      raise ValueError(f"statistics over {field!r}: expected one of {STATS_FIELDS}")
    doc[_block_key(field, flipped)] = _stats_block(block)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(doc, f)
  os.replace(tmp, path)


def per_channel(stats: LatentStats) -> LatentStats:
  """The statistics with `mean` and `std` replaced by the per-channel figures, broadcast over
  (H, W): `normalize` then standardizes each channel as a whole (config
  `data.normalization = "channel"`), not each element."""
  shape = stats.latent_shape
  return dataclasses.replace(
    stats,
    mean=np.broadcast_to(np.asarray(stats.channel_mean, np.float64), shape).copy(),
    std=np.broadcast_to(np.asarray(stats.channel_std, np.float64), shape).copy(),
  )


def load_latent_stats(
  path: str, *, use_flipped: bool = False, latent: str = "mean", normalization: str = "element"
) -> LatentStats:
  """Reads `latent_stats.json`.

  Args:
    path: the JSON file or the dataset folder holding it.
    use_flipped: return the statistics over originals + flipped copies (config
      `data.use_flipped`); an error if the dataset has none.
    latent: what training reads (config `data.latent`, LATENT_MODES): "sample" gives the
      statistics of the stored frozen draws, "mean" and "fresh" those of the means.
    normalization: config `data.normalization`, one of NORMALIZATIONS: "element"
      (docs/method.md §3.0) keeps the per-element mean and std, "channel" puts the per-channel
      ones in their place (`per_channel`).

  Returns:
    The statistics.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(
      f"data.normalization={normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
    )
  if os.path.isdir(path):
    path = os.path.join(path, STATS_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: it is written by the encode job (python -m lct_jax.encode) beside the "
      "shards once every shard exists; check data.dir"
    )
  if latent not in LATENT_MODES:
    raise ValueError(f"data.latent={latent!r}: expected one of {', '.join(LATENT_MODES)}")
  with open(path) as f:
    doc = json.load(f)
  if doc.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown format {doc.get('format')!r}, expected {FORMAT!r}")
  field = LATENT_MODES[latent]
  if _block_key(field, False) not in doc:
    raise ValueError(
      f"data.latent={latent!r}: {path} has no statistics of the {field!r} field; re-encode the "
      "dataset with lct_jax's encode job into a new or emptied output_dir"
    )
  key = _block_key(field, use_flipped)
  if key not in doc:
    raise ValueError(
      f"{path} has no statistics over flipped copies: the dataset was encoded without flips; "
      "set data.use_flipped=False or re-encode with flip=True"
    )
  block = doc[key]
  stats = LatentStats(
    mean=np.asarray(block["mean"], np.float64),
    std=np.asarray(block["std"], np.float64),
    channel_mean=tuple(block["channel_mean"]),
    channel_std=tuple(block["channel_std"]),
    num_latents=int(block["num_latents"]),
    includes_flipped=bool(block["includes_flipped"]),
    autoencoder=doc["autoencoder"],
    weights_hash=doc["weights_hash"],
    resolution=int(doc["resolution"]),
    scale_factor=float(doc["scale_factor"]),
    std_floor=float(doc["std_floor"]),
  )
  return per_channel(stats) if normalization == "channel" else stats


def _as(values: np.ndarray, like: Any) -> Any:
  if isinstance(like, jax.Array):
    return jnp.asarray(values, like.dtype)
  return np.asarray(values, np.asarray(like).dtype)


def normalize(z_raw: Any, stats: LatentStats, sigma_data: float = 0.5) -> Any:
  """(z_raw - mean) / std * sigma_data, per element; works on numpy and jax arrays (any batch dims).

  Args:
    z_raw: raw-scale latents (..., H, W, C).
    stats: the dataset statistics.
    sigma_data: target per-element std (0.5 in the paper).

  Returns:
    The normalized latents, same dtype as `z_raw`.
  """
  return (z_raw - _as(stats.mean, z_raw)) / _as(stats.effective_std, z_raw) * sigma_data


def denormalize(x: Any, stats: LatentStats, sigma_data: float = 0.5) -> Any:
  """Inverse of `normalize`: x / sigma_data * std + mean (what the VAE decoder takes)."""
  return x / sigma_data * _as(stats.effective_std, x) + _as(stats.mean, x)


def check_compatible(
  stats: LatentStats,
  *,
  autoencoder: str | ae_lib.Autoencoder,
  resolution: int | None = None,
  latent_shape: tuple[int, ...] | None = None,
) -> None:
  """Refuses a latent dataset made with another autoencoder or resolution than the config's.

  Args:
    stats: the dataset's statistics (its `latent_stats.json`).
    autoencoder: the config's `data.autoencoder` (a name), or a loaded autoencoder; a loaded one
      is accepted under another name when its weights hash matches.
    resolution: the config's `data.resolution`, if it has one.
    latent_shape: the config's `data.latent_shape`, if given.

  Raises:
    IncompatibleLatentsError: naming the config key, the recorded value and the configured one.
  """
  if isinstance(autoencoder, ae_lib.Autoencoder):
    same = autoencoder.weights_hash == stats.weights_hash
    configured = autoencoder.identity
  else:
    configured = ae_lib.canonical_name(autoencoder)
    same = configured == ae_lib.canonical_name(stats.autoencoder)
  if not same:
    raise IncompatibleLatentsError(
      f"data.autoencoder={configured!r} but the latent dataset was encoded with "
      f"{stats.autoencoder!r} (weights sha256 {stats.weights_hash[:12]}...). Set "
      f"data.autoencoder to {stats.autoencoder!r} or re-encode the dataset with "
      f"python -m lct_jax.encode --config.autoencoder={configured}."
    )
  if resolution is not None and int(resolution) != stats.resolution:
    raise IncompatibleLatentsError(
      f"data.resolution={resolution} but the latent dataset was encoded at resolution "
      f"{stats.resolution}; set data.resolution={stats.resolution} or re-encode."
    )
  if latent_shape is not None and tuple(latent_shape) != stats.latent_shape:
    raise IncompatibleLatentsError(
      f"data.latent_shape={tuple(latent_shape)} but the latent dataset's latents have shape "
      f"{stats.latent_shape} (autoencoder {stats.autoencoder!r}, resolution {stats.resolution})."
    )

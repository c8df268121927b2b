"""The encode job's library call: images -> autoencoder posterior moments -> latent dataset.

This module owns the job's control flow: which process encodes which shard, resuming, batching
over the local devices, skipping broken images, and the final metadata (`latent_stats.json`,
TFDS `dataset_info.json`, `encode_report.json`). File formats live in `latent_dataset` and
`latents`, image reading in `image_sources`.

Shard s holds the source images [s * shard_size, (s + 1) * shard_size) minus the unreadable ones,
in source order; process p of P encodes the shards with s % P == p. A shard is written under a
temporary name and renamed when complete, so a rerun after a crash encodes only the missing
shards and, with the same config and devices, produces the same files as an uninterrupted run.
Process 0 writes the metadata once every shard exists (after a barrier when there are several
processes); `dataset_info.json` comes last and marks the dataset finished.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import image_sources
from lct_jax.io import latent_dataset as ld
from lct_jax.io import latents as latents_lib

CONFIG_FILENAME = "encode_config.json"
REPORT_FILENAME = "encode_report.json"
SKIPPED_FILENAME = "skipped_images.txt"
# Config keys that change the dataset's content; a rerun into the same folder must agree on them.
CONTENT_KEYS = (
  "source",
  "path",
  "tfds_name",
  "split",
  "max_examples",
  "resolution",
  "flip",
  "seed",
  "shard_size",
  "labels_from_subdirs",
  "image_key",
  "label_key",
  "id_key",
)


class TooManyBadImagesError(RuntimeError):
  """More unreadable images than `max_bad_fraction` allows."""

  ADVICE = (
    "The good shards are kept: fix the images and use a new output_dir, or rerun with a larger "
    "max_bad_fraction."
  )


def _fingerprint(
  config: Any, ae: ae_lib.Autoencoder, source: image_sources.ImageSource, num_images: int
) -> dict[str, Any]:
  doc = {k: config.get(k) for k in CONTENT_KEYS}
  doc.update(
    autoencoder=ae.identity,
    weights_hash=ae.weights_hash,
    num_images=num_images,
    listing=source.listing_id(num_images),
  )
  return json.loads(json.dumps(doc))  # tuples -> lists, as read back from disk


def _check_or_write_fingerprint(folder: str, doc: dict[str, Any]) -> None:
  """Writes the fingerprint, or refuses a folder whose fingerprint differs."""
  path = os.path.join(folder, CONFIG_FILENAME)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in doc.items() if old.get(k) != v}
    if diff:
      lines = ", ".join(f"{k}: on disk {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(
        f"output_dir {folder} holds a dataset encoded with another config ({lines}). "
        "Use another output_dir, or delete that folder to re-encode."
      )
    return
  ld._atomic_write_json(path, doc)


class ShardedEncoder:
  """uint8 batches -> (mean, std) numpy, jitted, batch split over this process's devices."""

  def __init__(self, ae: ae_lib.Autoencoder, batch_size: int):
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    if self.batch_size != batch_size:
      logging.info(
        "batch_size %d -> %d (multiple of %d local devices)",
        batch_size,
        self.batch_size,
        len(devices),
      )
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.params = jax.device_put(ae.params, replicated)

    def encode(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
      x = images.astype(jnp.float32) / 127.5 - 1.0  # uint8 -> [-1, 1] (ToTensor + Normalize(.5))
      return ae.encode_fn(params, x)

    self.fn = jax.jit(encode, in_shardings=(replicated, self.data), out_shardings=self.data)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = images.shape[0]
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.uint8)
    padded[:k] = images
    mean, std = self.fn(self.params, jax.device_put(padded, self.data))
    return np.asarray(mean)[:k], np.asarray(std)[:k]


def frozen_eps(seed: int, index: int, flipped: bool, shape: tuple[int, ...]) -> np.ndarray:
  """The N(0, 1) noise of image `index`'s frozen posterior draw (docs/method.md §3.0, §9.16).

  sample = mean + std * eps, drawn once at encoding and stored: a generator seeded by (seed,
  source index, flipped) gives the same draw however the job is split into shards, batches or
  processes, and on a resumed run.
  """
  rng = np.random.default_rng([int(seed), int(index), int(flipped)])
  return rng.standard_normal(shape, np.float32)


def _encode_records(
  records: list[image_sources.Record], encoder: ShardedEncoder, flip: bool, seed: int
) -> list[dict[str, Any]]:
  images = np.stack([r.image for r in records])
  mean, std = encoder(images)
  if flip:
    f_mean, f_std = encoder(np.ascontiguousarray(images[:, :, ::-1]))
  shape = mean.shape[1:]
  examples = []
  for j, r in enumerate(records):
    sample = mean[j] + std[j] * frozen_eps(seed, r.index, False, shape)
    ex = dict(mean=mean[j], std=std[j], sample=sample, label=r.label, id=r.id, index=r.index)
    if flip:
      f_sample = f_mean[j] + f_std[j] * frozen_eps(seed, r.index, True, shape)
      ex.update(flipped_mean=f_mean[j], flipped_std=f_std[j], flipped_sample=f_sample)
    examples.append(ex)
  return examples


def _encode_shard(
  shard: int,
  num_shards: int,
  source: image_sources.ImageSource,
  num_images: int,
  config: Any,
  encoder: ShardedEncoder,
  features: Any,
  progress: Any,
) -> tuple[int, list[dict[str, Any]], int]:
  start = shard * config.shard_size
  stop = min(num_images, start + config.shard_size)
  examples, pending, skipped, small = [], [], [], []
  for record in source.read_range(start, stop, config.resolution):
    progress.update(1)
    if record.image is None:
      logging.warning("skipping unreadable image %s: %s", record.id, record.error)
      skipped.append({"id": record.id, "index": record.index, "error": record.error})
      continue
    if min(record.source_size) < config.resolution:
      small.append((min(record.source_size), list(record.source_size), record.id))
    pending.append(record)
    if len(pending) == encoder.batch_size:
      examples += _encode_records(pending, encoder, config.flip, config.seed)
      pending = []
  if pending:
    examples += _encode_records(pending, encoder, config.flip, config.seed)
  manifest = {
    "source_range": [start, stop],
    "skipped": skipped,
    "process": jax.process_index(),
    # Upsampled images: their count, and the smallest (its [width, height] and id).
    "smaller_than_resolution": {"count": len(small), "smallest": min(small)[1:] if small else None},
  }
  num_bytes = ld.write_shard(config.output_dir, shard, num_shards, features, examples, manifest)
  return stop - start, skipped, num_bytes


def _shard_stats(folder: str, num_shards: int, features: Any, flip: bool) -> dict[Any, Any]:
  """Moments of each stored field of latents_lib.STATS_FIELDS, in one pass over the shards:
  (field, False) over the originals and, when `flip`, (field, True) over originals + flips."""
  shape = features["mean"].shape
  keys = [
    (f, flipped)
    for f in latents_lib.STATS_FIELDS
    for flipped in ((False, True) if flip else (False,))
  ]
  total = {key: latents_lib.MomentAccumulator(shape) for key in keys}
  for shard in range(num_shards):
    examples = list(ld.read_shard(folder, shard, num_shards, features))
    if not examples:
      continue
    for field in latents_lib.STATS_FIELDS:
      acc = latents_lib.MomentAccumulator(shape)
      acc.update(np.stack([ex[field] for ex in examples]))
      total[field, False].merge(acc)
      if flip:
        total[field, True].merge(acc)
        flipped = latents_lib.MomentAccumulator(shape)
        flipped.update(np.stack([ex["flipped_" + field] for ex in examples]))
        total[field, True].merge(flipped)
  return total


def _finalize(
  config: Any, ae: ae_lib.Autoencoder, source: Any, num_images: int, num_shards: int, features: Any
) -> dict[str, Any]:
  folder = config.output_dir
  missing = [s for s in range(num_shards) if not ld.shard_done(folder, s, num_shards)]
  if missing:
    raise RuntimeError(
      f"{len(missing)} of {num_shards} shards missing in {folder} (first: {missing[:5]}) after all "
      "processes finished: is output_dir on a filesystem shared by every host?"
    )
  manifests = [ld.read_manifest(folder, s, num_shards) for s in range(num_shards)]
  skipped = [item for m in manifests for item in m["skipped"]]
  small = [m["smaller_than_resolution"] for m in manifests]
  num_small = sum(x["count"] for x in small)
  sizes = [x["smallest"] for x in small if x["count"]]
  smallest = min(sizes, default=None, key=lambda x: min(x[0]))
  lengths = [m["num_examples"] for m in manifests]
  num_bytes = sum(m["num_bytes"] for m in manifests)
  report = {
    "source": source.description,
    "autoencoder": ae.identity,
    "weights_hash": ae.weights_hash,
    "resolution": config.resolution,
    "images_read": num_images,
    "images_skipped": len(skipped),
    "images_smaller_than_resolution": num_small,
    "smallest_image": None if smallest is None else {"size": smallest[0], "id": smallest[1]},
    "examples_written": sum(lengths),
    "shards": num_shards,
    "bytes": num_bytes,
    "max_bad_fraction": config.max_bad_fraction,
    "posterior_draw_seed": int(config.seed),
    "skipped": skipped,
  }
  ld._atomic_write_json(os.path.join(folder, REPORT_FILENAME), report)
  if num_small:
    (w, h), image_id = smallest
    logging.warning(
      "%d of %d images are smaller than resolution=%d and are upsampled (smallest: %s, %dx%d); "
      "the count is in %s",
      num_small, num_images, config.resolution, image_id, w, h, REPORT_FILENAME,
    )
  with open(os.path.join(folder, SKIPPED_FILENAME), "w") as f:
    f.write(f"# {len(skipped)} of {num_images} images skipped (unreadable or truncated)\n")
    f.writelines(f"{s['id']}\t{s['error']}\n" for s in skipped)
  if len(skipped) > config.max_bad_fraction * num_images:
    raise TooManyBadImagesError(
      f"{len(skipped)} of {num_images} images could not be read, more than max_bad_fraction="
      f"{config.max_bad_fraction}; see {os.path.join(folder, SKIPPED_FILENAME)}. "
      + TooManyBadImagesError.ADVICE
    )
  common = dict(
    autoencoder=ae.identity,
    weights_hash=ae.weights_hash,
    resolution=int(config.resolution),
    scale_factor=float(ae.scale_factor),
  )
  blocks = {
    (field, flipped): latents_lib.LatentStats(**acc.finalize(), **common, includes_flipped=flipped)
    for (field, flipped), acc in _shard_stats(folder, num_shards, features, config.flip).items()
  }
  latents_lib.save_latent_stats(os.path.join(folder, latents_lib.STATS_FILENAME), blocks)
  stats = blocks["mean", False]
  metadata = {k: v for k, v in report.items() if k != "skipped"}
  metadata.update(
    latent_shape=list(stats.latent_shape), scale_factor=ae.scale_factor, flip=bool(config.flip)
  )
  ld.write_dataset_info(
    folder,
    features,
    lengths,
    num_bytes,
    metadata,
    description=f"lct_jax latent moments of {source.description} ({ae.identity})",
  )
  return report


def _encode_own_shards(
  config: Any,
  source: image_sources.ImageSource,
  ae: ae_lib.Autoencoder,
  num_images: int,
  num_shards: int,
  features: Any,
  summary: dict[str, Any],
) -> None:
  """Encodes this process's unfinished shards (s % P == p), counting into `summary`.

  Raises:
    TooManyBadImagesError: a single process has seen more unreadable images than
      max_bad_fraction allows (with several, process 0 checks the total at the end).
  """
  folder = config.output_dir
  pid, nproc = jax.process_index(), jax.process_count()
  mine = [s for s in range(num_shards) if s % nproc == pid]
  ld.remove_stale_temporaries(folder, mine, num_shards)
  todo = [s for s in mine if not ld.shard_done(folder, s, num_shards)]
  logging.info(
    "process %d/%d: %d of its %d shards to encode (%s, %s, latents %s)",
    pid,
    nproc,
    len(todo),
    len(mine),
    source.description,
    ae.identity,
    features["mean"].shape,
  )
  encoder = ShardedEncoder(ae, config.batch_size)
  total = sum(min(num_images, (s + 1) * config.shard_size) - s * config.shard_size for s in todo)
  from tqdm import tqdm

  skipped: list[dict[str, Any]] = []
  with tqdm(total=total, unit="img", desc=f"encode p{pid}", mininterval=2.0) as progress:
    for shard in todo:
      read, bad, nbytes = _encode_shard(
        shard, num_shards, source, num_images, config, encoder, features, progress
      )
      skipped += bad
      summary["images_read"] += read
      summary["images_skipped"] = len(skipped)
      summary["shards_written"] += 1
      summary["bytes"] += nbytes
      # This process's count is a lower bound on the dataset's: past the limit, stop now. Only
      # alone: with several processes the others would wait at the final barrier for ever.
      if nproc == 1 and len(skipped) > config.max_bad_fraction * num_images:
        first = "; ".join(f"{b['id']}: {b['error']}" for b in skipped[:3])
        raise TooManyBadImagesError(
          f"{len(skipped)} images could not be read by shard {shard} of {num_shards}, more than "
          f"max_bad_fraction={config.max_bad_fraction} of {num_images}; stopped early (first: "
          f"{first}). " + TooManyBadImagesError.ADVICE
        )


def encode_dataset(config: Any) -> dict[str, Any]:
  """Runs (or resumes) the encode job described by `config` (see configs/encode/*.py).

  Check the config first with `lct_jax.schema.check_encode` (the encode binary does). Call
  `jax.distributed.initialize` before this for a multi-process job; every process calls it with
  the same config.

  Args:
    config: the encode config (source, path / tfds_name, resolution, autoencoder, flip,
      output_dir, shard_size, batch_size, max_bad_fraction, ...).

  Returns:
    A summary: images read / skipped, examples and shards written, bytes, seconds and images/s
    of this process; process 0 adds the dataset totals of `encode_report.json`.
  """
  t0 = time.time()
  source = image_sources.make_source(config)  # a missing path fails before the VAE loads
  ae = ae_lib.load_autoencoder(config.autoencoder, local_files_only=config.local_files_only)
  num_images = len(source) if config.max_examples < 0 else min(len(source), config.max_examples)
  if num_images < 2:
    raise ValueError(f"{source.description} has {num_images} images; need at least 2")
  num_shards = math.ceil(num_images / config.shard_size)
  folder = config.output_dir
  os.makedirs(folder, exist_ok=True)
  _check_or_write_fingerprint(folder, _fingerprint(config, ae, source, num_images))
  features = ld.make_features(ae.latent_shape(config.resolution), config.flip)
  pid = jax.process_index()
  summary: dict[str, Any] = dict(
    process=pid, images_read=0, images_skipped=0, shards_written=0, bytes=0
  )
  if ld.is_complete(folder):
    logging.info("%s is already a finished dataset; nothing to do", folder)
    if pid == 0:
      with open(os.path.join(folder, REPORT_FILENAME)) as f:
        summary["dataset"] = {k: v for k, v in json.load(f).items() if k != "skipped"}
  else:
    _encode_own_shards(config, source, ae, num_images, num_shards, features, summary)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("lct_jax.encode: all shards written")
    if pid == 0:
      report = _finalize(config, ae, source, num_images, num_shards, features)
      summary["dataset"] = {k: v for k, v in report.items() if k != "skipped"}
  summary["seconds"] = time.time() - t0
  summary["images_per_s"] = summary["images_read"] / max(summary["seconds"], 1e-9)
  summary["output_dir"] = folder
  return summary

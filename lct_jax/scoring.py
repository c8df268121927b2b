"""Scoring generated images for the eval job: features, FID, precision/recall and the outputs.

Owns what turns a stream of generated uint8 images into a result (method.md section 7): the FID
Inception features of every batch streamed into float64 sums (no sample set is ever held in
memory; only the precision/recall features when that is on: Inception's 2048-d, or with
eval.pr_features="vgg16" VGG16's 4096-d fc2 features, the paper's, computed in the same pass),
optionally a JPEG-q75 round trip scored beside the lossless images (the paper's protocol), FID
against eval.reference_stats, improved precision/recall against eval.reference_features (made by
the same extractor and weights, or refused), and per result the files in
`workdir/eval/step_XXXXXXXX/`: the JSON (written atomically and last: the done marker), a sample
grid, clu scalars and the optional export (eval.export, lct_jax.image_files). It knows nothing
of checkpoints or samplers: `lct_jax.evaluation` hands it an image function per (checkpoint, run).
Multi-host: every process featurizes the rows on its own devices and the sums are merged with
`stats.allgather_merge`; process 0 writes the files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from lct_jax import config_lib, image_files
from lct_jax.core import mesh as mesh_lib
from lct_jax.fid import inception, inception_weights, npz_io, precision_recall, reference, stats, vgg
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import encode_config, image_sources, latents

FORMAT = "lct_jax/eval/v1"
EXPORTS = ("", "png", "npz")
PR_FEATURES = reference.PR_FEATURES  # ("inception", "vgg16")
FID_KEYS = ("fid", "fid_jpeg_q75")  # a result's FIDs: of the PNG images and after JPEG q75
# Result fields that must agree for an existing JSON to count as done for the current settings
# (with the sampler's fields, `Run.fields`); a result that differs or lacks one is refused.
SETTINGS_KEYS = (
  "num_samples",
  "seed",
  "jpeg",
  "model_dtype",
  "data_latent",
  "data_use_flipped",
  "latent_stats_sha256",
  "inception_weights_sha256",
  "autoencoder_weights_sha256",
  "reference_stats_sha256",
  "reference_features_sha256",
  "pr_k",
  "pr_features",
  "vgg16_weights_sha256",
)


def local_rows(x: jax.Array) -> list[tuple[int, np.ndarray]]:
  """This process's rows of a batch-sharded array: [(first row, rows)], ascending, no duplicates."""
  rows: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    if start not in rows:
      rows[start] = np.asarray(shard.data)
  return sorted(rows.items())


def load_result(path: str) -> dict[str, Any] | None:
  """A result JSON, or None when there is none."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _summaries() -> Any:
  """lct_jax.io.summaries, imported only after the autoencoder is loaded.

  It imports clu and with it TensorFlow; with torch installed, diffusers (the VAE) imports torch
  and triton, and triton segfaults when it is imported after TensorFlow (torch 2.14, TF 2.21).
  """
  from lct_jax.io import summaries

  return summaries


# ----------------------------------------------------------------------------------------------
# Scoring one (checkpoint, run).

# Global sample indices (B,) -> uint8 images (B, H, W, 3) sharded over the mesh's "data" axis.
GenerateFn = Callable[[np.ndarray], jax.Array]


@dataclasses.dataclass
class Scorer:
  """What stays fixed across checkpoints: networks, references, provenance, output folder.

  Attributes:
    pr_model: the precision/recall network when it is not the FID Inception (VGG16), else None.
  """

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  fid_model: inception.FidInception
  pr_model: vgg.Vgg16Features | None
  reference: stats.LoadedStats
  reference_features: np.ndarray | None
  provenance: dict[str, Any]
  writer: Any = None  # clu MetricWriter on workdir/eval, from `open_writer`

  def __post_init__(self):
    data, repl = mesh_lib.batch_sharding(self.mesh), mesh_lib.replicated(self.mesh)
    self._nets = {}  # name -> (jitted apply, replicated variables)
    for name, net in (("fid", self.fid_model), ("pr", self.pr_model)):
      if net is not None:
        apply = net.batch_apply(self.mesh.shape[mesh_lib.DATA_AXIS]) if name == "fid" else net.apply
        fn = jax.jit(apply, in_shardings=(repl, data), out_shardings=data)
        self._nets[name] = (fn, jax.device_put(net.variables, repl))

  def _featurize(self, name: str, images: jax.Array) -> list[tuple[int, np.ndarray]]:
    fn, variables = self._nets[name]
    return local_rows(fn(variables, images))

  def open_writer(self) -> None:
    """Creates workdir/eval and its clu writer (TensorFlow: after the autoencoder, see
    `_summaries`); the set-up calls it once every input has been loaded and checked."""
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
    from clu import metric_writers

    self.writer = metric_writers.create_default_writer(
      os.path.join(self.workdir, "eval"), just_logging=jax.process_index() > 0
    )

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()

  def out_dir(self, step: int) -> str:
    return os.path.join(self.workdir, "eval", f"step_{step:08d}")

  def result_path(self, step: int, name: str) -> str:
    return os.path.join(self.out_dir(step), f"{name}.json")

  def settings_diffs(self, result: Mapping[str, Any], fields: Mapping[str, Any]) -> list[str]:
    """How a result's settings (SETTINGS_KEYS, the sampler's `fields`) differ from the current
    ones, "key: old -> new" each ("missing" for a result written before the key was recorded)."""
    want = {**{k: self.provenance.get(k) for k in SETTINGS_KEYS}, **fields}
    return [
      f"{k}: {repr(result[k]) if k in result else 'missing'} -> {v!r}"
      for k, v in want.items()
      if k not in result or result[k] != v
    ]

  def is_done(self, step: int, name: str, fields: Mapping[str, Any]) -> bool:
    """Whether the result exists; one made with other settings (or before a setting was
    recorded) is an error, never overwritten."""
    path = self.result_path(step, name)
    result = load_result(path)
    if result is None:
      return False
    diffs = self.settings_diffs(result, fields)
    if diffs:
      raise ValueError(
        f"{path} was made with other eval settings ({'; '.join(diffs)}); move workdir/eval "
        "away or evaluate with the original settings"
      )
    return True

  def current_results(self, name: str, fields: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """step -> result of run `name` for every checkpoint scored with the current settings."""
    out = {}
    for path in glob.glob(os.path.join(self.workdir, "eval", "step_*", f"{name}.json")):
      result = load_result(path)
      if not self.settings_diffs(result, fields):
        out[int(result["step"])] = result
    return dict(sorted(out.items()))

  def _stream(
    self, step: int, name: str, generate: GenerateFn
  ) -> tuple[dict, dict, np.ndarray | None, str]:
    """Generates and featurizes eval.num_samples images batch by batch (nothing accumulates).

    Returns:
      (this process's feature sums per variant, its (indices, features) per variant for
      precision/recall (padded rows included: equal lengths on every process), the grid images
      or None, the image size "HxW").
    """
    ev = self.config.eval
    n, batch = ev.num_samples, ev.batch_size
    variants = ["png"] + (["jpeg_q75"] if ev.jpeg else [])
    sums = {v: stats.FeatureStats.zeros(inception.FEATURE_DIM) for v in variants}
    kept = {v: [] for v in variants}
    grid, grid_n, image_size = [], min(ev.grid_samples, n), ""
    exporter = image_files.SampleExporter(ev.export, self.out_dir(step), name, n, batch)
    progress = tqdm(
      total=n, unit="img", desc=f"step {step} {name}", mininterval=5.0,
      disable=jax.process_index() > 0,
    )
    with progress, concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      for start in range(0, n, batch):
        images = generate(np.arange(start, start + batch))
        image_size = f"{images.shape[1]}x{images.shape[2]}"
        if start < grid_n:
          grid.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
        rows = local_rows(images)
        valid = {off: max(0, min(len(a), n - start - off)) for off, a in rows}
        batches = {"png": images}
        if ev.jpeg:
          jpeg = {off: image_files.jpeg_roundtrip(a, pool) for off, a in rows}
          batches["jpeg_q75"] = jax.make_array_from_callback(
            images.shape, images.sharding, lambda index: jpeg[index[0].start or 0]
          )
        for v in variants:
          fid_rows = self._featurize("fid", batches[v])
          for off, f in fid_rows:
            sums[v].update(f[: valid[off]])
          if ev.precision_recall:
            pr_rows = self._featurize("pr", batches[v]) if self.pr_model else fid_rows
            kept[v] += [(np.arange(start + off, start + off + len(f)), f) for off, f in pr_rows]
        exporter.write(start, rows, valid, images.sharding)
        progress.update(min(batch, n - start))
    exporter.close()
    return sums, kept, np.concatenate(grid)[:grid_n] if grid else None, image_size

  def score(
    self, step: int, name: str, generate: GenerateFn, fields: Mapping[str, Any]
  ) -> dict[str, Any]:
    """Generates and scores eval.num_samples images; writes JSON, scalars, grid, export.

    Args:
      step: the checkpoint's step.
      name: the result's name ("nfe1", "nfe2_sigma0.821", ...): its files and scalar prefix.
      generate: global sample indices (eval.batch_size,) -> uint8 images (B, H, W, 3) sharded
        over the mesh's "data" axis; indices past eval.num_samples pad the last batch.
      fields: recorded in the result beside the scores (which sampler made the images).

    Returns:
      The result (also written to `result_path(step, name)` by process 0).
    """
    ev, n = self.config.eval, self.config.eval.num_samples
    t0 = time.perf_counter()
    sums, kept, grid, image_size = self._stream(step, name, generate)
    seconds = time.perf_counter() - t0
    label = stats.fid_label(n)
    result = dict(self.provenance, step=step, run=name, fid_label=label, **fields)
    result.update(sampling_seconds=seconds, samples_per_s=n / seconds)
    scalars = {f"{name}/samples_per_s": n / seconds}
    for variant, local in sums.items():
      total = stats.allgather_merge(local)
      if total.count != n:
        raise RuntimeError(f"scored {total.count} samples, expected {n}")
      meta = self.fid_model.stats_meta(image_size, n)
      generated = stats.LoadedStats(total.mean(), total.cov(), meta, total)
      metrics = {"fid": stats.fid_between(generated, self.reference)}
      if ev.precision_recall:
        metrics.update(self._precision_recall(kept[variant]))
      suffix = "" if variant == "png" else f"_{variant}"
      for metric, value in metrics.items():
        result[f"{metric}{suffix}"] = value
        scalars[f"{name}/{label if metric == 'fid' else metric}{suffix}"] = value
    result["total_seconds"] = time.perf_counter() - t0
    if jax.process_index() == 0:
      if grid is not None:
        summaries = _summaries()
        grid_path = os.path.join(self.out_dir(step), f"{name}_grid.png")
        summaries.save_png(grid_path, summaries.image_grid(grid))
      self.writer.write_scalars(step, scalars)
      self.writer.flush()
      npz_io.save_json_atomic(self.result_path(step, name), result)  # last: the done marker
    logging.info("step %d %s: %s", step, name, json.dumps(scalars))
    return result

  def _precision_recall(self, kept: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    idx = np.concatenate([i for i, _ in kept])
    feats = np.concatenate([f for _, f in kept])
    if jax.process_count() > 1:  # equal-length rows per process: every batch splits evenly
      idx = np.asarray(multihost_utils.process_allgather(idx)).reshape(-1)
      feats = np.asarray(multihost_utils.process_allgather(feats)).reshape(-1, feats.shape[-1])
    order = np.argsort(idx, kind="stable")
    feats = feats[order][idx[order] < self.config.eval.num_samples]
    return precision_recall.precision_recall(
      self.reference_features, feats, k=self.config.eval.pr_k
    )


def _check_reference_features(meta: stats.StatsMeta | None, ours: stats.StatsMeta, path: str):
  """Refuses precision/recall features made by another extractor, weights or preprocessing."""
  try:
    stats.check_compatible(meta, ours)
  except stats.IncompatibleStatsError as e:
    held = f"holds {meta.extractor} features" if meta else "has no provenance"
    vgg_flags = " --pr_features=vgg16 --vgg16_weights=..." if ours.extractor == "vgg16" else ""
    raise stats.IncompatibleStatsError(
      f"config.eval.reference_features={path!r} {held}, but eval.pr_features={ours.extractor!r} "
      f"needs {ours.extractor} features of the same weights and preprocessing ({e}); make them "
      f"with python -m lct_jax.tools.fid_stats ... --features_out=FILE{vgg_flags}"
    ) from None


def _check_reference_size(meta, sample_size: str, key: str, path: str, config) -> None:
  """Refuses a reference recorded at another image size than the run's decoded samples."""
  if meta is None or meta.image_size in stats.UNKNOWN_SIZES or meta.image_size == sample_size:
    return
  raise stats.IncompatibleStatsError(
    f"config.eval.{key}={path!r} was made from {meta.image_size} images, but this run's "
    f"samples are {sample_size} (data.autoencoder={config.data.autoencoder!r} decoding latents "
    f"{tuple(config.data.latent_shape)}); make the reference from {sample_size} images "
    "(eval.reference_images, or python -m lct_jax.tools.fid_stats)"
  )


def reference_source(config: ml_collections.ConfigDict) -> tuple[Any, str, int, int]:
  """The image source named by eval.reference_images, its description and its size.

  Returns:
    (source, description recorded as the statistics' `source`, number of images, resolution).
  """
  path = config.eval.reference_images
  cfg = encode_config.load_config_file(path, "eval.reference_images")
  source = image_sources.make_source(cfg)
  n = len(source) if cfg.max_examples < 0 else min(len(source), cfg.max_examples)
  res = int(cfg.resolution)
  desc = f"eval.reference_images={path}: {source.description}, {n} images at {res}x{res}"
  return source, f"{desc} ({source.listing_id(n)})", n, res


def _source_images(source: Any, n: int, resolution: int, path: str):
  for record in source.read_range(0, n, resolution):
    if record.error is not None:
      raise ValueError(f"config.eval.reference_images={path!r}: image {record.id}: {record.error}")
    yield record.image


def ensure_reference(config: ml_collections.ConfigDict, weights: str | None) -> None:
  """Makes eval.reference_stats (and eval.reference_features) from eval.reference_images when
  they do not exist yet; existing files must have been made from the same images.

  The images are the encode config's source at its resolution, as the encode job reads them
  (resized and centre-cropped, no flips). Process 0 computes; the others wait for it.

  Raises:
    stats.IncompatibleStatsError: an existing file made from other images (named, with both
      sources).
  """
  ev = config.eval
  paths = [os.path.abspath(os.path.expanduser(ev.reference_stats))]
  if ev.precision_recall:
    paths.append(os.path.abspath(os.path.expanduser(ev.reference_features)))
  source, desc, n, res = reference_source(config)
  if all(os.path.isfile(p) for p in paths):
    for path in paths:
      meta = npz_io.read_npz(path, meta_only=True)[1] or {}
      if meta.get("source") != desc:
        raise stats.IncompatibleStatsError(
          f"{path} holds the reference of {meta.get('source')!r}, but eval.reference_images "
          f"gives {desc!r}; delete the file to make it anew, or point eval.reference_stats / "
          "eval.reference_features elsewhere"
        )
    return
  if jax.process_index() == 0:
    logging.info("Making the FID reference of %s: %s", desc, ", ".join(paths))
    reference.compute_reference_stats(
      paths[0],
      _source_images(source, n, res, ev.reference_images),
      desc,
      weights,
      batch_size=ev.batch_size,
      features_out=paths[1] if ev.precision_recall else None,
      pr_features=ev.pr_features if ev.precision_recall else "inception",
      vgg16_weights=ev.vgg16_weights or None,
      total=n,
    )
  multihost_utils.sync_global_devices("lct_jax reference statistics")


def build_scorer(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh,
  ae: ae_lib.Autoencoder,
) -> Scorer:
  """Loads the networks and the references, checks them against each other, records provenance.

  Args:
    config: the training config (validated by `evaluation.validate`).
    workdir: the run's folder (results go to workdir/eval).
    mesh: devices to score on.
    ae: the run's autoencoder, for the provenance (load it before this call: see `_summaries`).

  Returns:
    The scorer; nothing is written until its `open_writer` (so a failing set-up leaves no files).

  Raises:
    inception.WeightsNotFoundError: no converted Inception (or VGG16) weights; the message gives
      the conversion command.
    stats.IncompatibleStatsError: reference statistics/features made by another extractor, other
      weights or preprocessing, or from images of another size than the samples.
    FileNotFoundError: a missing reference file.
  """
  ev = config.eval
  absolute = lambda p: os.path.abspath(os.path.expanduser(p)) if p else None  # noqa: E731
  # The default weights file is made the first time (no torch needed); a given one must exist.
  weights = absolute(ev.inception_weights) or inception_weights.ensure_weights()
  if ev.reference_images:
    ensure_reference(config, weights)
  fid_model = inception.load_inception(weights)
  pr_model, vgg_path = None, None
  if ev.precision_recall and ev.pr_features == vgg.EXTRACTOR:
    vgg_path = absolute(ev.vgg16_weights)
    pr_model = vgg.load_vgg16(vgg_path)
  ref_path = absolute(ev.reference_stats)
  if not os.path.isfile(ref_path):
    raise FileNotFoundError(f"config.eval.reference_stats={ev.reference_stats!r}: no such file")
  reference = stats.load_stats(ref_path)
  stats.check_compatible(reference.meta, fid_model.stats_meta())
  h, w = config.data.latent_shape[:2]
  sample_size = f"{h * ae.downsample_factor}x{w * ae.downsample_factor}"
  _check_reference_size(reference.meta, sample_size, "reference_stats", ref_path, config)
  feats, feats_path, feats_meta = None, None, None
  if ev.precision_recall:
    feats_path = absolute(ev.reference_features)
    if not os.path.isfile(feats_path):
      raise FileNotFoundError(
        f"config.eval.reference_features={ev.reference_features!r}: no such file"
      )
    feats, feats_meta = stats.load_features(feats_path)
    ours = (pr_model or fid_model).stats_meta()
    _check_reference_features(feats_meta, ours, feats_path)
    _check_reference_size(feats_meta, sample_size, "reference_features", feats_path, config)
    if len(feats) <= ev.pr_k:
      raise config_lib.ConfigError(
        f"config.eval.reference_features={feats_path!r}: needs more than eval.pr_k={ev.pr_k} images"
      )
  devices = jax.devices()
  latent_stats = absolute(os.path.join(config.data.dir, latents.STATS_FILENAME))
  provenance = dict(
    format=FORMAT,
    workdir=os.path.abspath(workdir),
    checkpoints=os.path.join(os.path.abspath(workdir), "checkpoints"),
    num_samples=int(ev.num_samples),
    seed=int(ev.seed),
    batch_size=int(ev.batch_size),
    jpeg=bool(ev.jpeg),
    jpeg_quality=image_files.JPEG_QUALITY if ev.jpeg else None,
    pr_k=int(ev.pr_k) if ev.precision_recall else None,
    pr_features=str(ev.pr_features) if ev.precision_recall else None,
    inception_weights=weights,
    inception_weights_sha256=fid_model.weights_sha256,
    preprocessing=fid_model.preprocessing,
    vgg16_weights=vgg_path,
    vgg16_weights_sha256=pr_model.weights_sha256 if pr_model else None,
    vgg16_resize=pr_model.resize if pr_model else None,
    autoencoder=ae.identity,
    autoencoder_weights_sha256=ae.weights_hash,
    model_dtype=str(config.model.dtype),
    data_latent=str(config.data.latent),
    data_use_flipped=bool(config.data.use_flipped),
    latent_stats=latent_stats,
    # None when missing: `evaluation.build_sampling` then refuses it, naming data.dir.
    latent_stats_sha256=npz_io.file_digest(latent_stats)
    if os.path.isfile(latent_stats)
    else None,
    reference_stats=ref_path,
    reference_stats_sha256=npz_io.file_digest(ref_path),
    reference_num_images=reference.meta.num_images,
    reference_image_size=reference.meta.image_size,
    reference_source=reference.meta.source,
    reference_features=feats_path,
    reference_features_sha256=npz_io.file_digest(feats_path) if feats_path else None,
    reference_features_num_images=int(len(feats)) if feats is not None else None,
    reference_features_image_size=feats_meta.image_size if feats_meta else None,
    num_processes=jax.process_count(),
    num_devices=mesh.size,
    device_kind=devices[0].device_kind,
    backend=jax.default_backend(),
  )
  return Scorer(config, workdir, mesh, fid_model, pr_model, reference, feats, provenance)

"""Scores generated images for the eval job: features, FID, precision/recall and the outputs.

It turns a stream of generated uint8 images into a result (docs/method.md section 7):

- The FID Inception features of every batch stream into float64 sums; no sample set is held in
  memory.
- Only precision/recall keeps features (when it is on): Inception's 2048-d, or VGG16's 4096-d
  fc2 features (the paper's) with eval.pr_features="vgg16", computed in the same pass.
- eval.jpeg scores a JPEG-q75 round trip beside the lossless images (the paper's protocol).
- FID is against eval.reference_stats, improved precision/recall against
  eval.reference_features. A reference made by another extractor, other weights or other
  preprocessing is refused.
- Each result writes its files to `workdir/eval/step_XXXXXXXX/`: the JSON (atomically and last:
  the done marker), a sample grid, clu scalars and the optional export (eval.export,
  lct_jax.image_files).

It knows nothing of checkpoints or samplers: `lct_jax.evaluation` hands it an image function per
(checkpoint, run). On several hosts, every process featurizes the rows on its own devices and
`stats.allgather_merge` merges the sums; process 0 writes the files.
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
from clu import metric_writers
from jax.experimental import multihost_utils
from tqdm import tqdm

from lct_jax import image_files, schema
from lct_jax.core import mesh as mesh_lib
from lct_jax.fid import inception, inception_weights, npz_io, precision_recall, reference, stats
from lct_jax.fid import vgg
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import encode_config, image_sources, latents, summaries

FORMAT = "lct_jax/eval/v1"
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
        apply = net.batch_apply(self.mesh.size) if name == "fid" else net.apply
        fn = jax.jit(apply, in_shardings=(repl, data), out_shardings=data)
        self._nets[name] = (fn, jax.device_put(net.variables, repl))

  def _featurize(self, name: str, images: jax.Array) -> list[tuple[int, np.ndarray]]:
    fn, variables = self._nets[name]
    return local_rows(fn(variables, images))

  def open_writer(self) -> None:
    """Creates workdir/eval and its clu writer; the set-up calls it once every input has been
    loaded and checked."""
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
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
        grid_path = os.path.join(self.out_dir(step), f"{name}_grid.png")
        image = summaries.sample_grid(grid, self.config.data.num_classes, ev.class_label)
        summaries.save_png(grid_path, image)
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


@dataclasses.dataclass(frozen=True)
class _Networks:
  """The feature networks and the weights files they come from."""

  inception_path: str
  fid_model: inception.FidInception
  pr_model: vgg.Vgg16Features | None  # VGG16 for eval.pr_features="vgg16" precision/recall
  vgg16_path: str | None


@dataclasses.dataclass(frozen=True)
class _References:
  """The reference statistics and, with precision/recall, the reference features, all checked."""

  stats_path: str
  statistics: stats.LoadedStats
  features_path: str | None = None
  features: np.ndarray | None = None
  features_meta: stats.StatsMeta | None = None


def _absolute(path: str | None) -> str | None:
  """`path` with ~ expanded, made absolute; None for an empty one."""
  return os.path.abspath(os.path.expanduser(path)) if path else None


def _inception_weights(ev: ml_collections.ConfigDict) -> str:
  """The FID Inception weights file: eval.inception_weights, which must exist, or the default
  one, made the first time (no torch needed)."""
  return _absolute(ev.inception_weights) or inception_weights.ensure_weights()


def _load_networks(ev: ml_collections.ConfigDict, weights: str) -> _Networks:
  """The FID Inception and, for eval.pr_features="vgg16" precision/recall, VGG16."""
  fid_model = inception.load_inception(weights)
  if not (ev.precision_recall and ev.pr_features == vgg.EXTRACTOR):
    return _Networks(weights, fid_model, None, None)
  vgg_path = _absolute(ev.vgg16_weights)
  return _Networks(weights, fid_model, vgg.load_vgg16(vgg_path), vgg_path)


def _sample_size(config: ml_collections.ConfigDict, ae: ae_lib.Autoencoder) -> str:
  """The decoded samples' size, "HxW"."""
  h, w = config.data.latent_shape[:2]
  return f"{h * ae.downsample_factor}x{w * ae.downsample_factor}"


def _existing_file(ev: ml_collections.ConfigDict, key: str) -> str:
  """eval.<key> made absolute; FileNotFoundError when there is no such file."""
  path = _absolute(ev[key])
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.eval.{key}={ev[key]!r}: no such file")
  return path


def _load_reference_features(
  config: ml_collections.ConfigDict, ours: stats.StatsMeta, sample_size: str
) -> tuple[str, np.ndarray, stats.StatsMeta | None]:
  """eval.reference_features, checked against the precision/recall network's provenance `ours`,
  the samples' size and eval.pr_k.

  Returns:
    (absolute path, features, their provenance).
  """
  ev = config.eval
  path = _existing_file(ev, "reference_features")
  feats, meta = stats.load_features(path)
  _check_reference_features(meta, ours, path)
  _check_reference_size(meta, sample_size, "reference_features", path, config)
  if len(feats) <= ev.pr_k:
    raise schema.ConfigError(
      f"config.eval.reference_features={path!r}: needs more than eval.pr_k={ev.pr_k} images"
    )
  return path, feats, meta


def _load_references(
  config: ml_collections.ConfigDict, nets: _Networks, sample_size: str
) -> _References:
  """Loads eval.reference_stats (and eval.reference_features) and checks them against the
  networks and the samples' size."""
  path = _existing_file(config.eval, "reference_stats")
  loaded = stats.load_stats(path)
  stats.check_compatible(loaded.meta, nets.fid_model.stats_meta())
  _check_reference_size(loaded.meta, sample_size, "reference_stats", path, config)
  if not config.eval.precision_recall:
    return _References(path, loaded)
  ours = (nets.pr_model or nets.fid_model).stats_meta()
  return _References(path, loaded, *_load_reference_features(config, ours, sample_size))


def _settings_provenance(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The result format, the run's folders and the eval settings."""
  ev = config.eval
  workdir = os.path.abspath(workdir)
  return dict(
    format=FORMAT,
    workdir=workdir,
    checkpoints=os.path.join(workdir, "checkpoints"),
    num_samples=int(ev.num_samples),
    seed=int(ev.seed),
    batch_size=int(ev.batch_size),
    jpeg=bool(ev.jpeg),
    jpeg_quality=image_files.JPEG_QUALITY if ev.jpeg else None,
    pr_k=int(ev.pr_k) if ev.precision_recall else None,
    pr_features=str(ev.pr_features) if ev.precision_recall else None,
  )


def _network_provenance(nets: _Networks) -> dict[str, Any]:
  """The feature networks' weights files, their hashes and preprocessing."""
  pr_model = nets.pr_model
  return dict(
    inception_weights=nets.inception_path,
    inception_weights_sha256=nets.fid_model.weights_sha256,
    preprocessing=nets.fid_model.preprocessing,
    vgg16_weights=nets.vgg16_path,
    vgg16_weights_sha256=pr_model.weights_sha256 if pr_model else None,
    vgg16_resize=pr_model.resize if pr_model else None,
  )


def _model_provenance(config: ml_collections.ConfigDict, ae: ae_lib.Autoencoder) -> dict[str, Any]:
  """The autoencoder, the model's dtype and the latent data the model was trained on."""
  latent_stats = _absolute(os.path.join(config.data.dir, latents.STATS_FILENAME))
  return dict(
    autoencoder=ae.identity,
    autoencoder_weights_sha256=ae.weights_hash,
    model_dtype=str(config.model.dtype),
    data_latent=str(config.data.latent),
    data_use_flipped=bool(config.data.use_flipped),
    latent_stats=latent_stats,
    # None for a scorer built without a latent dataset (the eval job loads it before this).
    latent_stats_sha256=npz_io.file_digest(latent_stats) if os.path.isfile(latent_stats) else None,
  )


def _reference_provenance(refs: _References) -> dict[str, Any]:
  """The reference files, their hashes and what they were made from."""
  meta, feats = refs.statistics.meta, refs.features
  return dict(
    reference_stats=refs.stats_path,
    reference_stats_sha256=npz_io.file_digest(refs.stats_path),
    reference_num_images=meta.num_images,
    reference_image_size=meta.image_size,
    reference_source=meta.source,
    reference_features=refs.features_path,
    reference_features_sha256=npz_io.file_digest(refs.features_path)
    if refs.features_path
    else None,
    reference_features_num_images=int(len(feats)) if feats is not None else None,
    reference_features_image_size=refs.features_meta.image_size if refs.features_meta else None,
  )


def _device_provenance(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The processes and devices that score."""
  return dict(
    num_processes=jax.process_count(),
    num_devices=mesh.size,
    device_kind=jax.devices()[0].device_kind,
    backend=jax.default_backend(),
  )


def build_scorer(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh,
  ae: ae_lib.Autoencoder,
) -> Scorer:
  """Loads the networks and the references, checks them against each other, records provenance.

  Args:
    config: the training config (checked by `schema.check_eval`).
    workdir: the run's folder (results go to workdir/eval).
    mesh: devices to score on.
    ae: the run's autoencoder: its identity and weights hash for the provenance, its
      downsampling factor for the samples' size.

  Returns:
    The scorer; nothing is written until its `open_writer` (so a failing set-up leaves no files).

  Raises:
    inception.WeightsNotFoundError: no converted Inception (or VGG16) weights; the message gives
      the conversion command.
    stats.IncompatibleStatsError: reference statistics/features made by another extractor, other
      weights or preprocessing, or from images of another size than the samples.
    FileNotFoundError: a missing reference file.
    schema.ConfigError: eval.reference_features holds no more than eval.pr_k images.
  """
  weights = _inception_weights(config.eval)
  if config.eval.reference_images:
    ensure_reference(config, weights)
  nets = _load_networks(config.eval, weights)
  refs = _load_references(config, nets, _sample_size(config, ae))
  provenance = {
    **_settings_provenance(config, workdir),
    **_network_provenance(nets),
    **_model_provenance(config, ae),
    **_reference_provenance(refs),
    **_device_provenance(mesh),
  }
  return Scorer(
    config, workdir, mesh, nets.fid_model, nets.pr_model, refs.statistics, refs.features, provenance
  )

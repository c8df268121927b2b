"""The eval job's library call: `evaluate(config, workdir, follow=False)` (method.md sections 6, 7).

Owns scoring a training run: restoring the EMA params of a checkpoint, sampling exactly
eval.num_samples images with 1 step and with 2 steps for each eval.sigma_mid, decoding them with
the run's autoencoder to uint8, optionally a JPEG-q75 round trip (the paper's protocol, reported
beside the lossless numbers), Inception features streamed batch by batch into float64 sums (no
sample set is ever held in memory; only the 2048-d features when precision/recall is on), FID
against eval.reference_stats, improved precision/recall against eval.reference_features, and the
outputs in `workdir/eval/`:

  step_00010000/nfe1.json, nfe2_sigma0.821.json   one result per (checkpoint, NFE, sigma_mid)
  step_00010000/nfe1_grid.png                     the first eval.grid_samples samples
  step_00010000/nfe1_samples/ or nfe1_samples.npz optional export (eval.export)
  events.out.tfevents...                          clu scalars at the checkpoint's step

A result JSON is written atomically and last, so it is the done marker: a killed evaluation
rerun (or `--follow` restarted) skips every (checkpoint, run) whose JSON exists. Sample i draws
its noise from fold_in(PRNGKey(eval.seed), i) and every stage is per-sample, so the image set does
not depend on the device count, process count or batch size. Multi-host: each global batch of
indices is sharded over all devices, every process handles the rows on its own devices, and the
feature sums are merged with `stats.allgather_merge`; process 0 decides which checkpoint comes
next and writes the files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import time
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from lct_jax import config_lib
from lct_jax.core import mesh as mesh_lib
from lct_jax.core import sampling, train
from lct_jax.fid import inception, npz_io, precision_recall, preprocess, stats
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import checkpoint, latents
from lct_jax.tools import fid_stats

FORMAT = "lct_jax/eval/v1"
EXPORTS = ("", "png", "npz")
JPEG_QUALITY = 75  # PIL's default, what the paper's `Image.save("x.jpg")` used
# Result fields that must agree for an existing JSON to count as done for the current settings.
SETTINGS_KEYS = (
  "num_samples",
  "seed",
  "jpeg",
  "inception_weights_sha256",
  "autoencoder_weights_sha256",
  "reference_stats_sha256",
  "reference_features_sha256",
  "pr_k",
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One sampler: 1 + len(sigma_mids) network evaluations."""

  sigma_mids: tuple[float, ...] = ()

  @property
  def nfe(self) -> int:
    return 1 + len(self.sigma_mids)

  @property
  def name(self) -> str:
    """ "nfe1", "nfe2_sigma0.821", ...: the result file's name."""
    if not self.sigma_mids:
      return "nfe1"
    return f"nfe{self.nfe}_sigma" + "_".join(f"{s:g}" for s in self.sigma_mids)


def runs_of(config: ml_collections.ConfigDict) -> list[Run]:
  """1 step, then 2 steps for each intermediate sigma of eval.sigma_mid (a sweep)."""
  return [Run()] + [Run((float(s),)) for s in config.eval.sigma_mid]


def _fail(key: str, value: Any, why: str) -> None:
  raise config_lib.ConfigError(f"config.{key}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError naming the eval.* key that cannot work."""
  ev = config.eval
  if ev.num_samples < 2:
    _fail("eval.num_samples", ev.num_samples, "FID needs at least 2 samples")
  if ev.batch_size < 1 or ev.batch_size % num_devices:
    _fail("eval.batch_size", ev.batch_size, f"must be a positive multiple of {num_devices} devices")
  if ev.grid_samples < 0:
    _fail("eval.grid_samples", ev.grid_samples, "must be >= 0 (0: no grid)")
  if ev.precision_recall and not 1 <= ev.pr_k < ev.num_samples:
    _fail("eval.pr_k", ev.pr_k, f"must lie in [1, eval.num_samples={ev.num_samples})")
  if ev.export not in EXPORTS:
    _fail("eval.export", ev.export, f"expected one of {EXPORTS}")
  if ev.pr_features != "inception":
    _fail("eval.pr_features", ev.pr_features, "only 'inception' features are implemented")
  if not ev.reference_stats:
    _fail(
      "eval.reference_stats",
      "",
      "FID needs reference statistics; make them with python -m lct_jax.tools.fid_stats "
      "--images=REAL_IMAGES (or --latents=DATA_DIR) --out=ref.npz [--features_out=ref_feat.npz]",
    )
  if ev.precision_recall and not ev.reference_features:
    _fail(
      "eval.reference_features",
      "",
      "precision/recall needs real features (fid_stats --features_out=...); or set "
      "eval.precision_recall=False",
    )


# ----------------------------------------------------------------------------------------------
# Sampling and decoding.


def global_indices(indices: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """A (B,) int32 array of global sample indices sharded over "data" (each process its part)."""
  indices = np.asarray(indices, np.int32)
  return jax.make_array_from_callback(
    indices.shape, mesh_lib.batch_sharding(mesh), lambda index: indices[index]
  )


def local_rows(x: jax.Array) -> list[tuple[int, np.ndarray]]:
  """This process's rows of a batch-sharded array: [(first row, rows)], ascending, no duplicates."""
  rows: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    if start not in rows:
      rows[start] = np.asarray(shard.data)
  return sorted(rows.items())


class ImageGenerator:
  """Global sample indices -> decoded uint8 images (B, H, W, 3), sharded over the mesh."""

  def __init__(
    self,
    model: Any,
    config: ml_collections.ConfigDict,
    run: Run,
    ae: ae_lib.Autoencoder,
    latent_stats: latents.LatentStats,
    mesh: jax.sharding.Mesh,
  ):
    """Builds the jitted sample -> denormalize -> decode function.

    Args:
      model: the network (config_lib.build_model).
      config: the training config (noise constants, data.sigma_data, eval.seed).
      run: which sampler.
      ae: the run's autoencoder.
      latent_stats: the latent dataset's statistics (for denormalizing).
      mesh: device mesh; batches are split over its "data" axis.
    """
    self.mesh = mesh
    sampler = sampling.make_sampler(
      model,
      config_lib.noise_config(config),
      config_lib.example_shape(config),
      mesh,
      run.sigma_mids,
    )
    sigma_data = config.data.sigma_data

    def generate(params, ae_params, key, indices):
      z = latents.denormalize(sampler(params, key, indices), latent_stats, sigma_data)
      return ae_lib.images_to_uint8(ae.decode_fn(ae_params, z))

    data, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    self._fn = jax.jit(generate, in_shardings=(repl, repl, repl, data), out_shardings=data)
    self._ae_params = jax.device_put(ae.params, repl)
    self._key = jax.device_put(jax.random.PRNGKey(config.eval.seed), repl)

  def __call__(self, params: Any, indices: np.ndarray) -> jax.Array:
    """uint8 images of the global indices (B,) (B divisible by the mesh size), sharded."""
    return self._fn(params, self._ae_params, self._key, global_indices(indices, self.mesh))


def generate_images(
  generator: ImageGenerator, params: Any, start: int, stop: int, batch_size: int
) -> np.ndarray:
  """uint8 images of global indices [start, stop) in order, on every process (grids, tests).

  Args:
    generator: the sampler + decoder.
    params: EMA params (replicated on the generator's mesh).
    start, stop: the index range.
    batch_size: global batch (a multiple of the mesh size); the last batch is padded.

  Returns:
    uint8 (stop - start, H, W, 3).
  """
  out = []
  for s in range(start, stop, batch_size):
    images = generator(params, np.arange(s, s + batch_size))
    out.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
  return np.concatenate(out)[: stop - start]


def jpeg_roundtrip(
  images: np.ndarray, pool: concurrent.futures.Executor | None = None
) -> np.ndarray:
  """Each uint8 (H, W, 3) image saved as JPEG quality 75 with PIL (default 4:2:0) and read back."""

  def one(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    with Image.open(buf) as decoded:
      return np.asarray(decoded.convert("RGB"))

  mapped = pool.map(one, images) if pool is not None else map(one, images)
  return np.stack(list(mapped)) if len(images) else images


class NpzStreamWriter:
  """Writes uint8 images to an .npz (`arr_0` (N, H, W, C), `indices` (N,)) batch by batch.

  `arr_0` is the layout of the guided-diffusion evaluator's sample batches. The archive is
  streamed (never held in memory) into a temporary file and renamed when complete.
  """

  def __init__(self, path: str, count: int, image_shape: tuple[int, ...]):
    self.path, self.count, self.written, self.indices = path, count, 0, []
    self._tmp = f"{path}.tmp-{os.getpid()}"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
    header = {"descr": "|u1", "fortran_order": False, "shape": (count, *image_shape)}
    np.lib.format.write_array_header_2_0(self._member, header)

  def write(self, images: np.ndarray, indices: np.ndarray) -> None:
    self._member.write(np.ascontiguousarray(images, np.uint8).tobytes())
    self.written += len(images)
    self.indices.extend(int(i) for i in indices)

  def close(self) -> None:
    if self.written != self.count:
      raise RuntimeError(f"{self.path}: wrote {self.written} images, header says {self.count}")
    self._member.close()
    buf = io.BytesIO()
    np.save(buf, np.asarray(self.indices, np.int64))
    self._zip.writestr("indices.npy", buf.getvalue())
    self._zip.close()
    os.replace(self._tmp, self.path)


# ----------------------------------------------------------------------------------------------
# Scoring one (checkpoint, run).


@dataclasses.dataclass
class Scorer:
  """What stays fixed across checkpoints: Inception, references, autoencoder, output folder."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: Any
  ae: ae_lib.Autoencoder
  latent_stats: latents.LatentStats
  fid_model: inception.FidInception
  reference: stats.LoadedStats
  reference_features: np.ndarray | None
  provenance: dict[str, Any]
  writer: Any  # clu MetricWriter
  generators: dict[str, ImageGenerator] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    data, repl = mesh_lib.batch_sharding(self.mesh), mesh_lib.replicated(self.mesh)
    self._features = jax.jit(self.fid_model.apply, in_shardings=(repl, data), out_shardings=data)
    self._inception_vars = jax.device_put(self.fid_model.variables, repl)

  def out_dir(self, step: int) -> str:
    return os.path.join(self.workdir, "eval", f"step_{step:08d}")

  def result_path(self, step: int, run: Run) -> str:
    return os.path.join(self.out_dir(step), f"{run.name}.json")

  def is_done(self, step: int, run: Run) -> bool:
    """Whether the result exists; one made with other settings is an error, never overwritten."""
    path = self.result_path(step, run)
    if not os.path.isfile(path):
      return False
    with open(path) as f:
      old = json.load(f)
    diffs = [
      f"{k}: {old.get(k)!r} -> {self.provenance.get(k)!r}"
      for k in SETTINGS_KEYS
      if old.get(k) != self.provenance.get(k)
    ]
    if diffs:
      raise ValueError(
        f"{path} was made with other eval settings ({'; '.join(diffs)}); move workdir/eval "
        "away or evaluate with the original settings"
      )
    return True

  def _stream(self, step: int, run: Run, params: Any) -> tuple[dict, dict, np.ndarray | None]:
    """Generates and featurizes eval.num_samples images batch by batch (nothing accumulates).

    Returns:
      (this process's feature sums per variant, its (indices, features) per variant for
      precision/recall (padded rows included: equal lengths on every process), the grid images
      or None).
    """
    ev = self.config.eval
    if run.name not in self.generators:
      self.generators[run.name] = ImageGenerator(
        self.model, self.config, run, self.ae, self.latent_stats, self.mesh
      )
    generator = self.generators[run.name]
    n, batch = ev.num_samples, ev.batch_size
    variants = ["png"] + (["jpeg_q75"] if ev.jpeg else [])
    sums = {v: stats.FeatureStats.zeros(inception.FEATURE_DIM) for v in variants}
    kept = {v: [] for v in variants}
    grid, grid_n = [], min(ev.grid_samples, n)
    exporter = _Exporter(ev.export, self.out_dir(step), run.name, n, batch)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      for start in range(0, n, batch):
        images = generator(params, np.arange(start, start + batch))
        if start < grid_n:
          grid.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
        rows = local_rows(images)
        valid = {off: max(0, min(len(a), n - start - off)) for off, a in rows}
        batches = {"png": images}
        if ev.jpeg:
          jpeg = {off: jpeg_roundtrip(a, pool) for off, a in rows}
          batches["jpeg_q75"] = jax.make_array_from_callback(
            images.shape, images.sharding, lambda index: jpeg[index[0].start or 0]
          )
        for v in variants:
          for off, f in local_rows(self._features(self._inception_vars, batches[v])):
            sums[v].update(f[: valid[off]])
            if ev.precision_recall:
              kept[v].append((np.arange(start + off, start + off + len(f)), f))
        exporter.write(start, rows, valid, images.sharding)
    exporter.close()
    return sums, kept, np.concatenate(grid)[:grid_n] if grid else None

  def score(self, step: int, run: Run, params: Any) -> dict[str, Any]:
    """Samples, decodes and scores eval.num_samples images; writes JSON, scalars, grid, export.

    Args:
      step: the checkpoint's step.
      run: which sampler.
      params: the checkpoint's EMA params, replicated on the mesh.

    Returns:
      The result (also written to `result_path(step, run)` by process 0).
    """
    ev, n = self.config.eval, self.config.eval.num_samples
    t0 = time.perf_counter()
    sums, kept, grid = self._stream(step, run, params)
    seconds = time.perf_counter() - t0
    label = stats.fid_label(n)
    result = dict(self.provenance, step=step, run=run.name, nfe=run.nfe, fid_label=label)
    result.update(sigma_mid=run.sigma_mids[0] if run.sigma_mids else None)
    result.update(sigma_mids=list(run.sigma_mids), sampling_seconds=seconds)
    result.update(samples_per_s=n / seconds)
    scalars = {f"{run.name}/samples_per_s": n / seconds}
    for variant, local in sums.items():
      total = stats.allgather_merge(local)
      if total.count != n:
        raise RuntimeError(f"scored {total.count} samples, expected {n}")
      generated = stats.LoadedStats(total.mean(), total.cov(), self._generated_meta(n), total)
      metrics = {"fid": stats.fid_between(generated, self.reference)}
      if ev.precision_recall:
        metrics.update(self._precision_recall(kept[variant]))
      suffix = "" if variant == "png" else f"_{variant}"
      for name, value in metrics.items():
        result[f"{name}{suffix}"] = value
        scalars[f"{run.name}/{label if name == 'fid' else name}{suffix}"] = value
    result["total_seconds"] = time.perf_counter() - t0
    if jax.process_index() == 0:
      if grid is not None:
        summaries = _summaries()
        grid_path = os.path.join(self.out_dir(step), f"{run.name}_grid.png")
        summaries.save_png(grid_path, summaries.image_grid(grid))
      self.writer.write_scalars(step, scalars)
      self.writer.flush()
      npz_io.save_json_atomic(self.result_path(step, run), result)  # last: the done marker
    logging.info("step %d %s: %s", step, run.name, json.dumps(scalars))
    return result

  def _generated_meta(self, n: int) -> stats.StatsMeta:
    h, w = self.ae.downsample_factor * np.asarray(self.config.data.latent_shape[:2])
    return stats.StatsMeta(
      self.fid_model.weights_sha256, preprocess.PREPROCESSING, inception.FEATURE_DIM, f"{h}x{w}", n
    )

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


class _Exporter:
  """eval.export: PNGs named by global index, or one streamed .npz per process ("" = nothing)."""

  def __init__(self, kind: str, out_dir: str, run_name: str, n: int, batch: int):
    self.kind, self.n, self.batch = kind, n, batch
    self.folder = os.path.join(out_dir, f"{run_name}_samples")
    p, count = jax.process_index(), jax.process_count()
    self.npz_path = self.folder + ("" if count == 1 else f".p{p:03d}of{count:03d}") + ".npz"
    self._npz: NpzStreamWriter | None = None

  def _local_count(self, sharding: jax.sharding.Sharding) -> int:
    """How many of the n samples land on this process's devices (the npz header needs it)."""
    shards = sharding.addressable_devices_indices_map((self.batch,)).values()
    slices = {s[0].start or 0: s[0].stop or self.batch for s in shards}
    return sum(
      max(0, min(stop, self.n - start) - off)
      for start in range(0, self.n, self.batch)
      for off, stop in slices.items()
    )

  def write(
    self, start: int, rows: list[tuple[int, np.ndarray]], valid: dict[int, int], sharding: Any
  ) -> None:
    """This process's rows of the batch at `start`; `valid[off]` of the rows at `off` count."""
    if not self.kind:
      return
    if self.kind == "npz" and self._npz is None:
      os.makedirs(os.path.dirname(self.npz_path), exist_ok=True)
      shape = rows[0][1].shape[1:]
      self._npz = NpzStreamWriter(self.npz_path, self._local_count(sharding), shape)
    for off, images in rows:
      images = images[: valid[off]]
      indices = np.arange(start + off, start + off + len(images))
      if self._npz is not None:
        self._npz.write(images, indices)
      elif self.kind == "png":
        os.makedirs(self.folder, exist_ok=True)
        for i, image in zip(indices, images):
          Image.fromarray(image).save(os.path.join(self.folder, f"{i:06d}.png"))

  def close(self) -> None:
    if self._npz is not None:
      self._npz.close()


def _summaries() -> Any:
  """lct_jax.io.summaries, imported only after the autoencoder is loaded.

  It imports clu and with it TensorFlow; with torch installed, diffusers (the VAE) imports torch
  and triton, and triton segfaults when it is imported after TensorFlow (torch 2.14, TF 2.21).
  """
  from lct_jax.io import summaries

  return summaries


# ----------------------------------------------------------------------------------------------
# The job: set-up, checkpoint selection, following a training run.


def _broadcast(values: list[int]) -> list[int]:
  """Process 0's integers on every process (only process 0 reads the result files)."""
  if jax.process_count() == 1:
    return values
  out = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))
  return [int(v) for v in np.asarray(out)]


def build_scorer(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh: jax.sharding.Mesh,
  ae: ae_lib.Autoencoder,
) -> Scorer:
  """Loads Inception, the references and the latent statistics; checks them against each other.

  Args:
    config: the training config.
    workdir: the run's folder (results go to workdir/eval).
    mesh: devices to sample and score on.
    ae: the run's autoencoder (load it before this call: see `_summaries`).

  Returns:
    The scorer, with a clu writer on workdir/eval.

  Raises:
    inception.WeightsNotFoundError: no converted Inception weights (the message gives the
      conversion command).
    stats.IncompatibleStatsError: reference statistics/features made with other weights or
      preprocessing.
    FileNotFoundError, latents.IncompatibleLatentsError: missing or mismatched inputs.
  """
  ev = config.eval
  weights = (
    os.path.abspath(os.path.expanduser(ev.inception_weights)) if ev.inception_weights else None
  )
  fid_model = inception.load_inception(weights)
  ours = stats.StatsMeta(
    fid_model.weights_sha256, preprocess.PREPROCESSING, inception.FEATURE_DIM, "", 0
  )
  ref_path = os.path.abspath(os.path.expanduser(ev.reference_stats))
  if not os.path.isfile(ref_path):
    raise FileNotFoundError(f"config.eval.reference_stats={ev.reference_stats!r}: no such file")
  reference = stats.load_stats(ref_path)
  stats.check_compatible(reference.meta, ours)
  feats, feats_path, feats_meta = None, None, None
  if ev.precision_recall:
    feats_path = os.path.abspath(os.path.expanduser(ev.reference_features))
    if not os.path.isfile(feats_path):
      raise FileNotFoundError(
        f"config.eval.reference_features={ev.reference_features!r}: no such file"
      )
    feats, feats_meta = fid_stats.load_features(feats_path)
    stats.check_compatible(feats_meta, ours)
    if len(feats) <= ev.pr_k:
      _fail("eval.reference_features", feats_path, f"needs more than eval.pr_k={ev.pr_k} images")
  data_dir = os.path.expanduser(config.data.dir)
  latent_stats = latents.load_latent_stats(data_dir, use_flipped=config.data.use_flipped)
  latents.check_compatible(
    latent_stats, autoencoder=ae, latent_shape=tuple(config.data.latent_shape)
  )
  devices = jax.devices()
  provenance = dict(
    format=FORMAT,
    workdir=os.path.abspath(workdir),
    checkpoints=os.path.join(os.path.abspath(workdir), "checkpoints"),
    num_samples=int(ev.num_samples),
    seed=int(ev.seed),
    batch_size=int(ev.batch_size),
    jpeg=bool(ev.jpeg),
    jpeg_quality=JPEG_QUALITY if ev.jpeg else None,
    pr_k=int(ev.pr_k) if ev.precision_recall else None,
    pr_features="inception" if ev.precision_recall else None,
    inception_weights=weights or inception.default_weights_path(),
    inception_weights_sha256=fid_model.weights_sha256,
    preprocessing=preprocess.PREPROCESSING,
    autoencoder=ae.identity,
    autoencoder_weights_sha256=ae.weights_hash,
    latent_stats=os.path.abspath(os.path.join(data_dir, latents.STATS_FILENAME)),
    reference_stats=ref_path,
    reference_stats_sha256=fid_stats.file_sha256(ref_path),
    reference_num_images=reference.meta.num_images,
    reference_source=reference.meta.source,
    reference_features=feats_path,
    reference_features_sha256=fid_stats.file_sha256(feats_path) if feats_path else None,
    reference_features_num_images=int(len(feats)) if feats is not None else None,
    num_processes=jax.process_count(),
    num_devices=mesh.size,
    device_kind=devices[0].device_kind,
    backend=jax.default_backend(),
  )
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  from clu import metric_writers  # TensorFlow: after the autoencoder (see _summaries)

  writer = metric_writers.create_default_writer(
    os.path.join(workdir, "eval"), just_logging=jax.process_index() > 0
  )
  model = config_lib.build_model(config)
  return Scorer(
    config, workdir, mesh, model, ae, latent_stats, fid_model, reference, feats, provenance, writer
  )


def abstract_ema(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh) -> dict:
  """{"ema_params", "step"} of the saved TrainState as abstract arrays, replicated on `mesh`."""
  tx, _ = train.make_optimizer(config_lib.optim_config(config))
  state = train.abstract_train_state(model, tx, config_lib.example_shape(config), mesh)
  return {"ema_params": state.ema_params, "step": state.step}


def _load_result(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def evaluate_step(
  scorer: Scorer, reader: checkpoint.CheckpointReader, abstract: dict, step: int, runs: list[Run]
) -> list[dict[str, Any]]:
  """Scores every run of checkpoint `step` that has no result yet; returns all its results."""
  pid = jax.process_index()
  done = _broadcast([int(scorer.is_done(step, r)) if pid == 0 else 0 for r in runs])
  results: list[dict[str, Any]] = []
  todo = [r for r, d in zip(runs, done) if not d]
  if todo:
    restored = reader.restore_fields(step, abstract)
    if int(restored["step"]) != step:
      raise ValueError(f"checkpoint {step} holds step {int(restored['step'])}")
    params = restored["ema_params"]
  for run, d in zip(runs, done):
    if d:
      logging.info(
        "step %d %s: already evaluated (%s)", step, run.name, scorer.result_path(step, run)
      )
      results.append(_load_result(scorer.result_path(step, run)))
      continue
    results.append(scorer.score(step, run, params))
    if scorer.config.eval.pause_after_result_s > 0:
      time.sleep(scorer.config.eval.pause_after_result_s)
  return results


def _pending(scorer: Scorer, steps: list[int], runs: list[Run]) -> list[int]:
  return [s for s in steps if not all(scorer.is_done(s, r) for r in runs)]


def follow_run(
  scorer: Scorer, reader: checkpoint.CheckpointReader, abstract: dict, runs: list[Run]
) -> list[dict[str, Any]]:
  """Evaluates each checkpoint as training writes it, until the training's final step is done.

  Pending checkpoints are taken oldest first; one that training deleted (keep policy) before
  its turn is skipped with a warning. Gives up with TimeoutError after eval.follow_timeout_s
  without a new checkpoint.
  """
  ev, pid = scorer.config.eval, jax.process_index()
  final = config_lib.total_steps(scorer.config)
  results: list[dict[str, Any]] = []
  skipped: set[int] = set()
  last_progress = time.monotonic()
  while True:
    decision = -1  # -1: wait, -2: the final step is done, else the step to evaluate
    if pid == 0:
      pending = [s for s in _pending(scorer, reader.all_steps(), runs) if s not in skipped]
      if pending:
        decision = pending[0]
      elif not _pending(scorer, [final], runs):
        decision = -2
    (decision,) = _broadcast([decision])
    if decision == -2:
      logging.info("Final step %d evaluated; stopping.", final)
      return results
    if decision == -1:
      if time.monotonic() - last_progress > ev.follow_timeout_s:
        raise TimeoutError(
          f"no new checkpoint in {reader.directory} for {ev.follow_timeout_s:.0f} s "
          f"(eval.follow_timeout_s) and the final step {final} is not evaluated"
        )
      time.sleep(ev.follow_poll_s)
      continue
    try:
      results += evaluate_step(scorer, reader, abstract, decision, runs)
    except Exception:
      (gone,) = _broadcast([int(decision not in reader.all_steps()) if pid == 0 else 0])
      if not gone:
        raise
      logging.warning("Checkpoint %d was deleted before it could be evaluated; skipped.", decision)
      skipped.add(decision)
    last_progress = time.monotonic()


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, follow: bool = False
) -> list[dict[str, Any]]:
  """Scores the run in `workdir` (see the module docstring); resumes where a killed one stopped.

  Args:
    config: the training config (with its eval.* keys).
    workdir: the training job's workdir.
    follow: evaluate every checkpoint as training writes it, until its final step.

  Returns:
    The result dicts (as written to the JSON files) of the checkpoints considered.

  Raises:
    config_lib.ConfigError: an eval.* key that cannot work (named).
    FileNotFoundError: no checkpoint (without `follow`), or a missing input file.
    TimeoutError: `follow` saw no new checkpoint for eval.follow_timeout_s.
  """
  m = config.mesh
  if m.distributed:
    mesh_lib.initialize_distributed(
      m.coordinator_address, m.num_processes, m.process_id, m.cpu_collectives
    )
  mesh = mesh_lib.make_mesh(m.num_devices)
  config_lib.validate(config)
  validate(config, mesh.size)
  reader = checkpoint.CheckpointReader(workdir)
  ae = ae_lib.load_autoencoder(config.data.autoencoder)  # before TensorFlow: see _summaries
  _summaries().check_workdir(workdir, config, has_checkpoints=True)
  scorer = build_scorer(config, workdir, mesh, ae)
  abstract = abstract_ema(config, scorer.model, mesh)
  runs = runs_of(config)
  try:
    if follow:
      return follow_run(scorer, reader, abstract, runs)
    steps = reader.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {reader.directory}")
    step = config.eval.checkpoint_step
    if step < 0:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
        f"config.eval.checkpoint_step={step}: not among the checkpoints {steps} in "
        f"{reader.directory}"
      )
    return evaluate_step(scorer, reader, abstract, step, runs)
  finally:
    scorer.writer.close()
    reader.close()

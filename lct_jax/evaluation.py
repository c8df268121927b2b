"""The eval job's library call: `evaluate(config, workdir, follow=False)` (docs/method.md §6, §7).

- Restores the EMA params of a checkpoint, read-only, so it can follow a running training job.
- Samples exactly eval.num_samples images with 1 step, and with 2 steps for each eval.sigma_mid
  (one `sampling.SamplerSpec` each), and decodes them with the run's autoencoder to uint8.
- Chooses which (checkpoint, sampler) to score next; `lct_jax.scoring` scores them (features,
  FID, precision/recall) and writes the files in `workdir/eval/`:

  step_00010000/nfe1.json, nfe2_sigma0.821.json   one result per (checkpoint, sampler)
  step_00010000/nfe1_grid.png                     the first eval.grid_samples samples
  step_00010000/nfe1_samples/ or nfe1_samples.npz optional export (eval.export)
  events.out.tfevents...                          clu scalars at the checkpoint's step
  summary.json                                    final and best-of-last-N FIDs per sampler

A result JSON is written atomically and last, so it is the done marker. A killed evaluation,
rerun (or `--follow` restarted), skips every (checkpoint, sampler) whose JSON exists. A result
made with other settings (scoring.SETTINGS_KEYS and the sampler's) is an error, never
overwritten.

After each checkpoint, summary.json is rewritten from the current results (docs/method.md
§9.10): per sampler and FID variant, the newest scored checkpoint's FID and the lowest FID among
the last eval.best_of_last scored checkpoints, with their steps.

Sample i draws its noise from fold_in(PRNGKey(eval.seed), i) and every stage is per-sample, so
the image set does not depend on the device count, process count or batch size. Multi-host: each
global batch of indices is sharded over all devices, and every process handles the rows on its
own devices; process 0 decides which checkpoint comes next and writes the files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lct_jax import config_lib, jobs, schema, scoring
from lct_jax.core import mesh as mesh_lib
from lct_jax.core import sampling, train
from lct_jax.fid import npz_io
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import checkpoint, latents, summaries


SUMMARY_FILENAME = "summary.json"


# ----------------------------------------------------------------------------------------------
# Sampling and decoding.


def global_indices(indices: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """A (B,) int32 array of global sample indices sharded over "data" (each process its part)."""
  indices = np.asarray(indices, np.int32)
  return jax.make_array_from_callback(
    indices.shape, mesh_lib.batch_sharding(mesh), lambda index: indices[index]
  )


class ImageGenerator:
  """Global sample indices -> decoded uint8 images (B, H, W, 3), sharded over the mesh."""

  def __init__(
    self,
    model: Any,
    config: ml_collections.ConfigDict,
    spec: sampling.SamplerSpec,
    ae: ae_lib.Autoencoder,
    latent_stats: latents.LatentStats,
    mesh: jax.sharding.Mesh,
  ):
    """Builds the jitted sample -> denormalize -> decode function.

    Args:
      model: the network (config_lib.build_model).
      config: the training config (noise constants, data.sigma_data, eval.seed).
      spec: which sampler.
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
      spec.sigma_mids,
      spec.cfg_scale,
      config.eval.class_label,
    )
    sigma_data = config.data.sigma_data

    def generate(params, ae_params, key, indices):
      z = latents.denormalize(sampler(params, key, indices), latent_stats, sigma_data)
      return ae_lib.images_to_uint8(ae.decode_fn(ae_params, z))

    data, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    # Params keep the sharding they come in (the train state's: replicated or split over fsdp).
    self._fn = jax.jit(generate, in_shardings=(None, repl, repl, data), out_shardings=data)
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
    params: EMA params (on the generator's mesh, in any sharding).
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


@dataclasses.dataclass
class ImageGenerators:
  """The run's network, autoencoder and latent statistics, and one ImageGenerator per sampler,
  built on first use and kept for every later checkpoint (compiled once)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: Any
  ae: ae_lib.Autoencoder
  latent_stats: latents.LatentStats
  built: dict[str, ImageGenerator] = dataclasses.field(default_factory=dict)

  def __getitem__(self, spec: sampling.SamplerSpec) -> ImageGenerator:
    if spec.name not in self.built:
      self.built[spec.name] = ImageGenerator(
        self.model, self.config, spec, self.ae, self.latent_stats, self.mesh
      )
    return self.built[spec.name]


def build_generators(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  ae: ae_lib.Autoencoder,
  latent_stats: latents.LatentStats,
) -> ImageGenerators:
  """Checks the latent statistics against the autoencoder and builds the network.

  Raises:
    latents.IncompatibleLatentsError: statistics of another autoencoder or latent shape.
  """
  latents.check_compatible(
    latent_stats, autoencoder=ae, latent_shape=tuple(config.data.latent_shape)
  )
  return ImageGenerators(config, mesh, config_lib.build_model(config), ae, latent_stats)


# ----------------------------------------------------------------------------------------------
# The job: checkpoint selection, following a training run.


def _broadcast(values: list[int]) -> list[int]:
  """Process 0's integers on every process (only process 0 reads the result files)."""
  if jax.process_count() == 1:
    return values
  out = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))
  return [int(v) for v in np.asarray(out)]


def abstract_ema(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh) -> dict:
  """{"ema_params", "step"} of the saved TrainState as abstract arrays, sharded on `mesh` as the
  train state is (mesh.fsdp)."""
  tx, _ = train.make_optimizer(config_lib.optim_config(config))
  state = train.abstract_train_state(model, tx, config_lib.example_shape(config), mesh)
  return {"ema_params": state.ema_params, "step": state.step}


@dataclasses.dataclass
class _Job:
  """Everything the checkpoint loop needs: scorer, generators, checkpoint reader, samplers."""

  scorer: scoring.Scorer
  generators: ImageGenerators
  reader: checkpoint.CheckpointReader
  abstract: dict
  specs: list[sampling.SamplerSpec]


def evaluate_step(job: _Job, step: int) -> list[dict[str, Any]]:
  """Scores every run of checkpoint `step` that has no result yet, rewrites the summary; returns
  all the checkpoint's results."""
  scorer, pid = job.scorer, jax.process_index()
  done = [int(scorer.is_done(step, r.name, r.fields())) if pid == 0 else 0 for r in job.specs]
  done = _broadcast(done)
  results: list[dict[str, Any]] = []
  if not all(done):
    restored = job.reader.restore_fields(step, job.abstract)
    if int(restored["step"]) != step:
      raise ValueError(f"checkpoint {step} holds step {int(restored['step'])}")
    params = restored["ema_params"]
  for run, d in zip(job.specs, done):
    path = scorer.result_path(step, run.name)
    if d:
      logging.info("step %d %s: already evaluated (%s)", step, run.name, path)
      results.append(scoring.load_result(path))
      continue
    generator = job.generators[run]
    generate = lambda indices, g=generator: g(params, indices)  # noqa: E731
    results.append(scorer.score(step, run.name, generate, run.fields()))
  write_summary(scorer, job.specs)
  return results


def _pending(job: _Job, steps: list[int]) -> list[int]:
  return [s for s in steps if not all(job.scorer.is_done(s, r.name, r.fields()) for r in job.specs)]


def summarize(
  results: dict[str, dict[int, dict[str, Any]]], best_of_last: int
) -> dict[str, dict[str, Any]]:
  """Checkpoint selection (docs/method.md §9.10): the final checkpoint, and the best of the last N.

  Args:
    results: run name -> step -> result (as written to the JSON files).
    best_of_last: N.

  Returns:
    "run/fid" and "run/fid_jpeg_q75" (for the variants the results hold) -> {"final_step",
    "final": its FID, "best_step", "best": the lowest FID among the last N scored checkpoints
    (ties: the later step), "last_steps": those N steps}. The final step is the newest scored one.
  """
  out = {}
  for name, by_step in results.items():
    for metric in scoring.FID_KEYS:
      steps = [s for s, r in sorted(by_step.items()) if r.get(metric) is not None]
      if not steps:
        continue
      last = steps[-best_of_last:]
      best = min(reversed(last), key=lambda s: by_step[s][metric])
      out[f"{name}/{metric}"] = dict(
        final_step=last[-1],
        final=by_step[last[-1]][metric],
        best_step=best,
        best=by_step[best][metric],
        last_steps=last,
      )
  return out


def write_summary(
  scorer: scoring.Scorer, runs: list[sampling.SamplerSpec]
) -> dict[str, Any] | None:
  """Writes and logs workdir/eval/summary.json from the results made with the current settings
  (process 0; other processes return None).

  Returns:
    {"best_of_last": N, "training_final_step": K, "metrics": `summarize`'s}.
  """
  if jax.process_index() != 0:
    return None
  n = scorer.config.eval.best_of_last
  results = {r.name: scorer.current_results(r.name, r.fields()) for r in runs}
  metrics = summarize(results, n)
  summary = dict(
    best_of_last=n, training_final_step=schema.total_steps(scorer.config), metrics=metrics
  )
  path = os.path.join(scorer.workdir, "eval", SUMMARY_FILENAME)
  npz_io.save_json_atomic(path, summary)
  for key, m in metrics.items():
    logging.info(
      "%s: final %.4f (step %d), best of last %d %.4f (step %d)",
      key,
      m["final"],
      m["final_step"],
      n,
      m["best"],
      m["best_step"],
    )
  logging.info("Summary: %s", path)
  return summary


def follow_run(job: _Job) -> list[dict[str, Any]]:
  """Evaluates each checkpoint as training writes it, until the training's final step is done.

  Pending checkpoints are taken oldest first; one that training deleted (keep policy) before
  its turn is skipped with a warning. Gives up with TimeoutError after eval.follow_timeout_s
  without a new checkpoint.
  """
  ev, pid, reader = job.scorer.config.eval, jax.process_index(), job.reader
  final = schema.total_steps(job.scorer.config)
  results: list[dict[str, Any]] = []
  skipped: set[int] = set()
  last_progress = time.monotonic()
  while True:
    decision = -1  # -1: wait, -2: the final step is done, else the step to evaluate
    if pid == 0:
      pending = [s for s in _pending(job, reader.all_steps()) if s not in skipped]
      if pending:
        decision = pending[0]
      elif not _pending(job, [final]):
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
      results += evaluate_step(job, decision)
    except Exception:
      (gone,) = _broadcast([int(decision not in reader.all_steps()) if pid == 0 else 0])
      if not gone:
        raise
      logging.warning("Checkpoint %d was deleted before it could be evaluated; skipped.", decision)
      skipped.add(decision)
    last_progress = time.monotonic()


def format_result(result: dict[str, Any]) -> str:
  """One line for a result: sampler, FID, precision/recall, sample and reference counts."""
  sampler = f"{result['nfe']} NFE"
  if result.get("sigma_mid") is not None:
    sampler += f" (sigma_mid {result['sigma_mid']:g})"
  if result.get("cfg_scale", 1) != 1:
    sampler += f", guidance {result['cfg_scale']:g}"
  pr = ""
  if result.get("precision") is not None:
    pr = f", precision {result['precision']:.3f}, recall {result['recall']:.3f}"
  return (
    f"step {result['step']} {sampler}: FID {result['fid']:.2f}{pr} "
    f"({result['num_samples']} samples against {result['reference_num_images']} reference images)"
  )


def checkpoint_to_score(config: ml_collections.ConfigDict, reader) -> int:
  """eval.checkpoint_step, or the newest step when it is -1; checked before anything is written."""
  steps = reader.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {reader.directory}")
  step = config.eval.checkpoint_step
  if step < 0:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(
      f"config.eval.checkpoint_step={step}: not among the checkpoints {steps} in "
      f"{reader.directory}"
    )
  return step


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  follow: bool = False,
  mesh: jax.sharding.Mesh | None = None,
) -> list[dict[str, Any]]:
  """Scores the run in `workdir` (see the module docstring); resumes where a killed one stopped.

  Args:
    config: the training config (with its eval.* keys).
    workdir: the training job's workdir.
    follow: evaluate every checkpoint as training writes it, until its final step.
    mesh: the devices to use, when the caller has set them up (the training job's final
      evaluation); None starts the distributed system if configured and makes the mesh.

  Returns:
    The result dicts (as written to the JSON files) of the checkpoints considered.

  Raises:
    schema.ConfigError: a key that cannot work (named; jobs.setup_job).
    FileNotFoundError: no checkpoint (without `follow`), or a missing input file.
    TimeoutError: `follow` saw no new checkpoint for eval.follow_timeout_s.
  """
  setup = jobs.setup_job(config, workdir, "eval", mesh)
  mesh = setup.mesh
  reader = checkpoint.CheckpointReader(workdir)
  if not follow and config.eval.checkpoint_step >= 0:  # a chosen step that does not exist: now
    checkpoint_to_score(config, reader)
  ae = ae_lib.load_autoencoder(config.data.autoencoder)
  summaries.check_workdir(workdir, config, True)
  scorer = scoring.build_scorer(config, workdir, mesh, ae)
  generators = build_generators(config, mesh, ae, setup.latent_stats)
  abstract = abstract_ema(config, generators.model, mesh)
  specs = sampling.sweep(config.eval.sigma_mid, config.eval.cfg_scale)
  job = _Job(scorer, generators, reader, abstract, specs)
  step = None if follow else checkpoint_to_score(config, reader)  # before the events file opens
  scorer.open_writer()
  try:
    if follow:
      return follow_run(job)
    return evaluate_step(job, step)
  finally:
    scorer.close()
    reader.close()

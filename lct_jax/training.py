"""The training job's library call: `train_and_evaluate(config, workdir)`.

Owns the loop around the core step: multi-host start-up, the latent dataset (encoded on the fly
for the demo), restore-or-init, checkpoints with the data-iterator state, clu logs (metrics,
steps/s, images/s, data-wait time, the config), sample grids, non-finite-loss handling,
preemption and a clean stop after train.stop_after_steps. Metrics leave the device only on logging
steps. With eval.after_training, the eval job (`lct_jax.evaluation`) scores the final checkpoint in
the same process when the training reaches its last step.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from lct_jax import config_lib, evaluation, jobs, schema
from lct_jax.core import mesh as mesh_lib
from lct_jax.core import sampling
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import checkpoint, coupling, input_pipeline, latent_dataset, latents, summaries


class NonFiniteLossError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient."""


# Metrics logged as means over the steps since the last log (over its finite steps, as the
# update skips the others); the rest (N, c, learning rate) are the logging step's values, and
# `nonfinite` counts the window's skipped steps.
WINDOW_MEANS = ("loss", "ct_loss", "diff_loss", "grad_norm", "diff_fraction")


def _window_add(window: dict | None, metrics: dict) -> dict:
  """Adds one step's metrics to the window's sums, on the device (read only at logging steps)."""
  finite = metrics["nonfinite"] == 0
  step = {k: jnp.where(finite, metrics[k], 0.0) for k in WINDOW_MEANS}
  step.update(finite_steps=finite.astype(jnp.int32), nonfinite=metrics["nonfinite"])
  return step if window is None else jax.tree.map(jnp.add, window, step)


_window_start = jax.jit(functools.partial(_window_add, None))
_window_next = jax.jit(_window_add, donate_argnums=0)


def _scalars(metrics: dict, window: dict, nonfinite_steps) -> dict:
  out = {k: float(np.asarray(v)) for k, v in metrics.items()}
  if window["finite_steps"] > 0:  # else the step's own (non-finite) values
    out.update({k: float(window[k]) / int(window["finite_steps"]) for k in WINDOW_MEANS})
  out["nonfinite"] = int(window["nonfinite"])
  out["nonfinite_steps"] = int(nonfinite_steps)
  return out


def write_sample_grid(step, state, sampler, ae, stats, config, mesh, writer, workdir) -> None:
  """1-step samples from the EMA params, decoded, as a TensorBoard image and a PNG."""
  n = config.train.num_grid_samples
  idx = jax.device_put(np.arange(n, dtype=np.int32), mesh_lib.batch_sharding(mesh))
  x = sampler(state.ema_params, jax.random.PRNGKey(config.eval.seed), idx)
  x = np.asarray(jax.device_get(jax.experimental.multihost_utils.process_allgather(x, tiled=True)))
  images = np.asarray(ae.decode(latents.denormalize(x, stats, config.data.sigma_data)))
  grid = summaries.sample_grid(images, config.data.num_classes)
  writer.write_images(step, {"samples_1step": grid[None]})
  if jax.process_index() == 0:
    summaries.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (or resumes) the run in `workdir` up to the config's total steps.

  Raises:
    schema.ConfigError, ValueError, FileNotFoundError: bad config, workdir or data
      (jobs.setup_job); raised before anything in the workdir is written.
    NonFiniteLossError: after train.max_consecutive_nonfinite non-finite steps in a row.
  """
  setup = jobs.setup_job(config, workdir, "train")
  mesh, data_dir, stats = setup.mesh, setup.data_dir, setup.latent_stats
  latents.check_compatible(
    stats, autoencoder=config.data.autoencoder, latent_shape=tuple(config.data.latent_shape)
  )
  trainer = config_lib.build_trainer(config, mesh)
  total = schema.total_steps(config)
  loader = input_pipeline.make_loader(
    data_dir,
    stats,
    global_batch_size=config.train.global_batch_size,
    seed=config.seed,
    sigma_data=config.data.sigma_data,
    use_flipped=config.data.use_flipped,
    latent=config.data.latent,
    num_examples=config.data.num_examples if config.train.total_steps <= 0 else None,
    num_classes=config.data.num_classes,
  )
  batches = input_pipeline.GlobalBatches(loader, mesh, worker_count=config.data.worker_count)
  epoch_examples = len(latent_dataset.LatentMomentsSource(data_dir, config.data.use_flipped))

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(
    workdir,
    every_steps=config.ckpt.every_steps,
    keep=config.ckpt.keep,
    keep_every=config.ckpt.keep_every,
  )
  try:
    latest = ckpt.latest_step()
    summaries.check_workdir(workdir, config, latest is not None)
    summaries.write_config(workdir, config)
    writer = summaries.create_writer(workdir)
    writer.write_hparams({k: str(v) for k, v in summaries.flat_config(config).items()})
    if latest is not None:
      logging.info("Resuming from step %d in %s.", latest, ckpt.directory)
      state = ckpt.restore(latest, trainer.abstract_state(), batches)
    else:
      state = trainer.init_state(jax.random.PRNGKey(config.seed))
    if trainer.coupling_cost is not None:
      batches = coupling.HostCoupledBatches(batches, trainer.coupling_cost, state.key, mesh)
    step = _loop(
      config, workdir, trainer, state, batches, ckpt, writer, stats, total, mesh, epoch_examples
    )
  finally:
    ckpt.close()
    batches.close()
  if step == total and config.eval.after_training:
    score_final_checkpoint(config, workdir, mesh)


def score_final_checkpoint(config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
  """The eval job on the final checkpoint (eval.after_training); prints one line per sampler."""
  logging.info("eval.after_training: scoring the final checkpoint of %s", workdir)
  results = evaluation.evaluate(config, workdir, mesh=mesh)
  if jax.process_index() == 0:
    lines = [evaluation.format_result(r) for r in results]
    lines.append(f"results and sample grids: {os.path.join(workdir, 'eval')}")
    for line in lines:
      logging.info("%s", line)
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _check_streak(config, ckpt, writer, step, stop, streak, last_bad) -> None:
  """Raises NonFiniteLossError at the streak's maximum, or when the run ends inside a streak."""
  limit = config.train.max_consecutive_nonfinite
  if not streak or (streak < limit and step < stop):
    return
  writer.flush()
  first, last = last_bad + 2 - streak, last_bad + 1
  good = [s for s in ckpt.all_steps() if s < first]
  where = f"step {good[-1]}" if good else "none"
  ends = "" if streak >= limit else f"; the run reached its step {step} inside it, unsaved"
  raise NonFiniteLossError(
    f"{streak} consecutive non-finite steps, {first} to {last} "
    f"(train.max_consecutive_nonfinite={limit}){ends}; last good checkpoint: {where} in "
    f"{ckpt.directory}"
  )


def _loop(
  config, workdir, trainer, state, batches, ckpt, writer, stats, total, mesh, epoch_examples
) -> int:
  """Trains to the config's last step (or the stop); returns the step reached, -1 if preempted."""
  start = int(jax.device_get(state.step))
  log_every = config.train.log_every_steps
  sample_every = config.train.sample_every_steps
  sampler = ae = None
  if sample_every > 0:
    sampler = sampling.make_sampler(
      trainer.model, config_lib.noise_config(config), trainer.example_shape, mesh
    )
    try:
      ae = ae_lib.load_autoencoder(config.data.autoencoder)
    except ae_lib.AutoencoderLoadError as e:
      logging.warning("No sample grids: the autoencoder cannot be loaded (%s)", e)
  report = periodic_actions.ReportProgress(
    num_train_steps=total, writer=writer, every_steps=log_every
  )
  last_t, last_wait, last_step = time.perf_counter(), batches.wait_s, start
  step = start
  after = config.train.stop_after_steps
  stop = min(total, start + after) if after > 0 else total
  preempted = False
  window = None  # the metrics' sums since the last log (_window_add)
  while step < stop:
    batch = next(batches)
    state, metrics = trainer.train_step(state, batch)
    window = _window_start(metrics) if window is None else _window_next(window, metrics)
    step += 1
    report(step)
    if step == start + 1 and step % log_every and step != total:
      # The first window's rates start after the first step, which includes the compile (one
      # wait per start of the job; no value is read).
      jax.block_until_ready(state.step)
      last_t, last_wait, last_step = time.perf_counter(), batches.wait_s, step
    if step % log_every == 0 or step == total:
      scalars = _scalars(
        jax.device_get(metrics), jax.device_get(window), jax.device_get(state.nonfinite_steps)
      )
      window = None
      now = time.perf_counter()
      elapsed = max(now - last_t, 1e-9)
      scalars["img_per_s"] = (step - last_step) * config.train.global_batch_size / elapsed
      scalars["data_wait_s_per_step"] = (batches.wait_s - last_wait) / (step - last_step)
      scalars["data_wait_fraction"] = (batches.wait_s - last_wait) / elapsed
      # Epochs in both units (docs/method.md 9.8): over the training examples, flipped copies
      # included
      # (the unit of K), and over the distinct images.
      scalars["epoch"] = step * config.train.global_batch_size / epoch_examples
      scalars["epoch_images"] = scalars["epoch"] * (2 if config.data.use_flipped else 1)
      writer.write_scalars(step, scalars)
      last_t, last_wait, last_step = now, batches.wait_s, step
      # Steps are numbered as the logged metrics and the checkpoints: step n is the n-th update.
      if scalars["nonfinite_steps"]:
        logging.warning(
          "Non-finite loss or gradient: %d step(s) skipped so far, the last at step %d.",
          scalars["nonfinite_steps"],
          int(jax.device_get(state.last_nonfinite_step)) + 1,
        )
    # The save first: a failing sample grid must not lose the step, nor spend preemption's grace.
    preempted = ckpt.should_stop(step)
    saving = preempted or step == stop or ckpt.due(step)
    streak = 0
    if saving or step % log_every == 0 or step == total:
      # The streak is read at these steps only; the step halts on the device at its maximum.
      streak, last_bad = (int(v) for v in jax.device_get(
        (state.nonfinite_streak, state.last_nonfinite_step)
      ))
      _check_streak(config, ckpt, writer, step, stop, streak, last_bad)
    if saving and streak:
      # No save inside a streak: it would rotate the last good checkpoint out.
      logging.warning(
        "Not saving step %d: step %d was non-finite (%d in a row so far); newest checkpoint: %s.",
        step, last_bad + 1, streak, ckpt.latest_step(),
      )
    elif saving:
      ckpt.save(step, state, batches, force=True)
      logging.info("Saving the checkpoint of step %d in %s.", step, ckpt.directory)
    if preempted:
      saved = "not saved (non-finite streak)" if streak else "saved"
      logging.warning("Preemption signal: %s step %d, exiting.", saved, step)
      break
    if ae is not None and (step % sample_every == 0 or step == total):
      write_sample_grid(step, state, sampler, ae, stats, config, mesh, writer, workdir)
  if not preempted and step == stop < total:
    logging.info("train.stop_after_steps=%d: saved step %d, exiting.", after, step)
  writer.flush()
  return -1 if preempted else step

"""Train-step throughput: `python -m benchmarks.train_step --config=configs/ffhq.py --batch_size=8`.

Builds the configured network and the real train step (loss, OT, optimizer, EMA) on all local
devices, times `--steps` steps after `--warmup` (compile excluded), and prints one JSON line:
median step time, img_per_s, FLOPs per step from XLA's cost analysis, achieved TFLOP/s, peak
device memory where the backend reports it. Needs only the core layer (jax, flax, optax, ott-jax).
"""

import glob
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import profile_summary
from lct_jax import config_lib, schema
from lct_jax.core import mesh as mesh_lib
from lct_jax.io import coupling

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ffhq.py", "Training config.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_DTYPE = flags.DEFINE_string("dtype", None, "Override model.dtype (float32 | bfloat16).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (the first compiles).")
_OT = flags.DEFINE_string("ot_method", None, "Override ot.method.")
_SCOPE = flags.DEFINE_string("ot_scope", None, "Override ot.scope.")
_MICRO = flags.DEFINE_integer("microbatches", None, "Override train.microbatches.")
_LABEL = flags.DEFINE_string(
  "label", "", "Free text copied into the result (e.g. the code version)."
)
_PROFILE = flags.DEFINE_integer(
  "profile_steps", 0, "After timing, trace this many steps with jax.profiler and add the breakdown."
)
_DUMP = flags.DEFINE_string(
  "dump_dir", None, "With --profile_steps: keep the gzipped trace and optimized HLO here."
)
_ATTN = flags.DEFINE_string("attention", None, "Override model.attention.")
_PEAK = flags.DEFINE_float(
  "peak_tflops", 0.0, "Measured matmul peak (benchmarks.matmul_peak) for the MFU; 0: none."
)
_IN_STEP = flags.DEFINE_bool(
  "ot_in_step",
  False,
  "exact/global OT: solve inside the step (pure_callback) instead of on the host one step ahead "
  "as the training job does (io.coupling.HostCoupledBatches).",
)


class _SameBatch:
  """The data-iterator protocol HostCoupledBatches wraps, always yielding one batch."""

  def __init__(self, batch):
    self.batch, self.next_batch, self.wait_s = batch, 0, 0.0

  def __next__(self):
    self.next_batch += 1
    return self.batch


def step_flops(lowered) -> float | None:
  """FLOPs of one step from XLA's cost analysis of the lowered (pre-optimization) HLO.

  The lowered program is the same on every backend. The compiled GPU program's own analysis
  misses the convolutions that became cuDNN custom calls, so it cannot be the MFU numerator.
  Backends behind a PJRT plugin (jax's CUDA plugin among them) do not implement the lowered
  analysis: the same HLO module is then analysed by the CPU client's HloCostAnalysis (equal to
  the primary path on CPU).
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    try:
      from jax._src.lib import _jax  # noqa: PLC0415 - private, a fallback for this script only

      cpu = jax.local_devices(backend="cpu")[0].client
      cost = _jax.hlo_module_cost_analysis(cpu, lowered._lowering.hlo().as_hlo_module())
    except Exception:  # noqa: BLE001
      return None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0, where the backend keeps memory statistics."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def profile(step, state, batch, batches, steps: int, dump_dir: str | None, tag: str, hlo: str):
  """Traces `steps` more steps; returns profile_summary's breakdown (and keeps the files)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        state, metrics = step(state, batch if batches is None else next(batches))
      jax.block_until_ready((state.step, metrics))
    (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    summary = profile_summary.summarize(path, steps, hlo_text=hlo)
    if dump_dir:
      os.makedirs(dump_dir, exist_ok=True)
      with (
        open(path, "rb") as src,
        gzip.open(os.path.join(dump_dir, f"prof_{tag}.xplane.pb.gz"), "wb") as dst,
      ):
        shutil.copyfileobj(src, dst)
      with gzip.open(os.path.join(dump_dir, f"hlo_{tag}.txt.gz"), "wt") as dst:
        dst.write(hlo)
  return summary


def run(
  config,
  batch_size: int,
  steps: int,
  warmup: int,
  ot_in_step: bool = False,
  profile_steps: int = 0,
  dump_dir: str | None = None,
  label: str = "",
) -> dict:
  """Times the train step of `config` at `batch_size`; returns the result record.

  With exact OT the coupling is solved on the host one step ahead, as in the training job, unless
  `ot_in_step`; the time per step then includes waiting for it. `median_step_s` syncs after every
  step; `pipelined_step_s` is the mean over as many steps dispatched back to back, as the training
  loop runs them.
  """
  # The curriculum of the config's own batch size, whatever batch is timed (a batch larger than a
  # small config's dataset would otherwise leave no training steps).
  config.train.total_steps = schema.total_steps(config)
  config.train.global_batch_size = batch_size
  mesh = mesh_lib.make_mesh(config.mesh.num_devices, config.mesh.fsdp)
  trainer = config_lib.build_trainer(config, mesh)
  shape = trainer.example_shape
  state = trainer.init_state(jax.random.PRNGKey(0))
  step = trainer.train_step
  x = np.random.default_rng(0).normal(0, 0.5, (batch_size, *shape)).astype(np.float32)
  batch = {"x": jax.device_put(x, mesh_lib.batch_sharding(mesh))}
  if config.data.num_classes:  # class-conditional: random labels
    y = np.random.default_rng(1).integers(0, config.data.num_classes, batch_size).astype(np.int32)
    batch["label"] = jax.device_put(y, mesh_lib.batch_sharding(mesh))
  batches = None
  if trainer.coupling_cost is not None and not ot_in_step:
    batches = coupling.HostCoupledBatches(_SameBatch(batch), trainer.coupling_cost, state.key, mesh)
    batch = next(batches)  # its ot_perm: the step compiled below takes it
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = step_flops(lowered)
  for _ in range(warmup):
    state, metrics = step(state, batch if batches is None else next(batches))
  jax.block_until_ready(metrics)
  if batches is not None:
    batches.solve_wait_s = 0.0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch if batches is None else next(batches))
    jax.block_until_ready((state.step, metrics))
    times.append(time.perf_counter() - t0)
  solve_wait = batches.solve_wait_s / steps if batches is not None else None
  # As the training loop runs (it syncs on logging steps only): the same number of steps
  # dispatched back to back, one sync at the end.
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch if batches is None else next(batches))
  jax.block_until_ready((state.step, metrics))
  pipelined = (time.perf_counter() - t0) / steps
  summary = None
  if profile_steps:
    tag = f"{label or 'step'}_b{batch_size}_{config.model.dtype}"
    try:
      summary = profile(
        step, state, batch, batches, profile_steps, dump_dir, tag, compiled.as_text()
      )
    except Exception as err:  # noqa: BLE001 - a failed trace must not lose the timing
      summary = {"error": repr(err)[:500]}
  if batches is not None:
    batches.close()
  median = statistics.median(times)
  return {
    "benchmark": "train_step",
    "label": label,
    "batch_size": batch_size,
    "microbatches": config.train.microbatches,
    "dtype": config.model.dtype,
    "ot": f"{config.ot.method}/{config.ot.scope}",
    "ot_host_ahead": batches is not None,
    "ot_solve_wait_s_per_step": solve_wait,
    "attention": config.model.get("attention"),
    "devices": mesh.size,
    "device_kind": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "median_step_s": median,
    "min_step_s": min(times),
    "img_per_s": batch_size / median,
    "pipelined_step_s": pipelined,
    "pipelined_img_per_s": batch_size / pipelined,
    "flops_per_step": flops,
    "tflops_per_s": flops / median / 1e12 if flops else None,
    "model": config.model.name if config.model.name != "dit" else f"dit {config.model.dit_size}",
    "fsdp": config.mesh.fsdp,
    "compile_s": compile_s,
    "peak_memory_bytes": peak_memory_bytes(),
    "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    "profile": summary,
  }


def main(argv):
  del argv
  config = _CONFIG.value
  if _DTYPE.value:
    config.model.dtype = _DTYPE.value
  if _OT.value:
    config.ot.method = _OT.value
  if _SCOPE.value:
    config.ot.scope = _SCOPE.value
  if _MICRO.value:
    config.train.microbatches = _MICRO.value
  if _ATTN.value:
    config.model.attention = _ATTN.value
  result = run(
    config,
    _BATCH.value,
    _STEPS.value,
    _WARMUP.value,
    _IN_STEP.value,
    _PROFILE.value,
    _DUMP.value,
    _LABEL.value,
  )
  result = {"config": config_flags.get_config_filename(flags.FLAGS["config"]), **result}
  if _PEAK.value > 0 and result["tflops_per_s"]:
    result.update(peak_tflops=_PEAK.value, mfu=result["tflops_per_s"] / _PEAK.value)
  sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)

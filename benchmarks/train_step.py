"""Train-step throughput: `python benchmarks/train_step.py --config=configs/ffhq.py --batch_size=8`.

Builds the configured network and the real train step (loss, OT, optimizer, EMA) on all local
devices, times `--steps` steps after `--warmup` (compile excluded), and prints one JSON line:
median step time, img_per_s, FLOPs per step from XLA's cost analysis, achieved TFLOP/s, peak
device memory where the backend reports it. Needs only the core layer (jax, flax, optax, ott-jax).
"""

import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lct_jax import config_lib
from lct_jax.core import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ffhq.py", "Training config.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_DTYPE = flags.DEFINE_string("dtype", None, "Override model.dtype (float32 | bfloat16).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (the first compiles).")
_OT = flags.DEFINE_string("ot_method", None, "Override ot.method.")
_SCOPE = flags.DEFINE_string("ot_scope", None, "Override ot.scope.")


def step_flops(lowered) -> float | None:
  """FLOPs of one step from XLA's cost analysis of the lowered (pre-optimization) HLO.

  The lowered program is the same on every backend; the compiled GPU program's own analysis
  misses the convolutions that became cuDNN custom calls (an H200 run reported 0.32 TFLOP for a
  step whose lowered HLO has 13.3), so it cannot be the MFU numerator.
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0, where the backend keeps memory statistics."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run(config, batch_size: int, steps: int, warmup: int) -> dict:
  """Times the train step of `config` at `batch_size`; returns the result record."""
  config.train.global_batch_size = batch_size
  mesh = mesh_lib.make_mesh(config.mesh.num_devices)
  trainer = config_lib.build_trainer(config, mesh)
  shape = trainer.example_shape
  state = trainer.init_state(jax.random.PRNGKey(0))
  step = trainer.train_step
  x = np.random.default_rng(0).normal(0, 0.5, (batch_size, *shape)).astype(np.float32)
  batch = {"x": jax.device_put(x, mesh_lib.batch_sharding(mesh))}
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = step_flops(lowered)
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state.step, metrics))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {
    "benchmark": "train_step",
    "config": config.data.name,
    "batch_size": batch_size,
    "dtype": config.model.dtype,
    "ot": f"{config.ot.method}/{config.ot.scope}",
    "devices": mesh.size,
    "device_kind": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "median_step_s": median,
    "min_step_s": min(times),
    "img_per_s": batch_size / median,
    "flops_per_step": flops,
    "tflops_per_s": flops / median / 1e12 if flops else None,
    "compile_s": compile_s,
    "peak_memory_bytes": peak_memory_bytes(),
    "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
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
  result = run(config, _BATCH.value, _STEPS.value, _WARMUP.value)
  sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)

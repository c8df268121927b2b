"""Host-ahead exact OT behind a device step: `python -m benchmarks.ot_overlap --batch_size=1024`.

What the training loop (io.coupling.HostCoupledBatches) does with ot.method=exact, measured at
a batch too large to train in one step on this one device. Each step's assignment is the real
cost function of `train.make_coupling_cost` on batches of the paper's 32x32x4 latents, solved by
scipy on the host. It is solved while the device runs a stand-in step: a chain of bf16 matrix
products sized to take `--step_ms`. The default is the measured paper step at batch 128 on an
H100, the per-chip step of a global batch of 1024 on 8 chips.

Prints one JSON line: the step time without coupling, with it, the difference (what the coupling
costs the loop) and the host time spent waiting for solves.
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lct_jax.core import mesh as mesh_lib
from lct_jax.core import ot, train
from lct_jax.io import coupling

_BATCH = flags.DEFINE_integer("batch_size", 1024, "Rows of the coupled global batch.")
_SCOPE = flags.DEFINE_string("scope", "global", "ot.scope (local: one block per device).")
_STEP_MS = flags.DEFINE_float("step_ms", 77.7, "Device time of the stand-in step.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")
_SIZE = flags.DEFINE_integer("size", 4096, "Matrix size of the stand-in step's products.")


class _Batches:
  def __init__(self, x):
    self.x, self.next_batch, self.wait_s = x, 0, 0.0

  def __next__(self):
    self.next_batch += 1
    return {"x": self.x}


def stand_in_step(step_ms: float, size: int):
  """A jitted device step of about `step_ms` (bf16 size^3 products, calibrated here)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)

  def make(n):
    def f(m, batch):
      for _ in range(n):
        m = jnp.tanh(m @ a)
      return m, batch["ot_perm"][0] if "ot_perm" in batch else 0

    return jax.jit(f)

  f1 = make(1)
  m = jax.block_until_ready(f1(a, {})[0])
  t0 = time.perf_counter()
  for _ in range(10):
    m = f1(m, {})[0]
  jax.block_until_ready(m)
  n = max(1, round(step_ms / 1e3 / ((time.perf_counter() - t0) / 10)))
  return make(n), a


def timed(fn, m, batches, steps: int) -> tuple[float, object]:
  m, _ = fn(m, next(batches))
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    m, out = fn(m, next(batches))
    jax.block_until_ready((m, out))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), m


def main(argv):
  del argv
  mesh = mesh_lib.make_mesh(jax.device_count())
  cfg = ot.OTConfig("exact", _SCOPE.value)
  x = np.random.default_rng(0).normal(0, 0.5, (_BATCH.value, 32, 32, 4)).astype(np.float32)
  x = jax.device_put(x, mesh_lib.batch_sharding(mesh))
  fn, m = stand_in_step(_STEP_MS.value, _SIZE.value)
  plain, m = timed(fn, m, _Batches(x), _STEPS.value)
  cost_fn = train.make_coupling_cost(cfg, mesh)
  batches = coupling.HostCoupledBatches(_Batches(x), cost_fn, jax.random.PRNGKey(1), mesh)
  cost = np.asarray(jax.device_get(cost_fn(jax.random.PRNGKey(1), np.int32(0), x)))
  t0 = time.perf_counter()
  for block in cost.reshape(-1, *cost.shape[-2:]):
    ot.exact_assignment_host(block)
  solve_s = time.perf_counter() - t0
  coupled, m = timed(fn, m, batches, 2)  # compiles the ot_perm variant
  batches.solve_wait_s = 0.0
  coupled, m = timed(fn, m, batches, _STEPS.value)
  wait = batches.solve_wait_s / (_STEPS.value + 1)
  batches.close()
  row = {
    "benchmark": "ot_overlap",
    "batch_size": _BATCH.value,
    "scope": _SCOPE.value,
    "stand_in_step_ms": 1e3 * plain,
    "coupled_step_ms": 1e3 * coupled,
    "overhead": (coupled - plain) / plain,
    "solve_ms_alone": 1e3 * solve_s,
    "solve_wait_ms_per_step": 1e3 * wait,
    "devices": mesh.size,
    "device_kind": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
  }
  sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)

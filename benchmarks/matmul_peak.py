"""Peak matrix-product rate of device 0: the denominator of MFU, measured in the same run.

`python -m benchmarks.matmul_peak [--size=8192] [--dtype=bfloat16]` prints one JSON line with the
median TFLOP/s of a jitted size^3 product on random (not zero) inputs.
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

_SIZE = flags.DEFINE_integer("size", 8192, "Matrix side.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Operand dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed products.")


def main(argv):
  del argv
  n, dtype = _SIZE.value, jnp.dtype(_DTYPE.value)
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  sys.stdout.write(
    json.dumps(
      {
        "benchmark": "matmul_peak",
        "size": n,
        "dtype": str(dtype),
        "median_s": median,
        "tflops_per_s": 2 * n**3 / median / 1e12,
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
      }
    )
    + "\n"
  )


if __name__ == "__main__":
  app.run(main)

"""Benchmark of the OT coupling step (lct_jax.core.ot.couple): one JSON line per result.

Times the jitted ``couple`` on (B, dim) float32 data/noise sharded over all local devices, for each
method, scope and batch size; the median wall time per call (block_until_ready, compile/warm-up
excluded) is printed, optionally as a share of a given train-step time. Uses the core layer only
(jax, optax, numpy, scipy; ott-jax for ``sinkhorn``), so it runs on a bare accelerator box.

  python benchmarks/ot.py --batch_sizes=64,128,256 --dim=4096 --repeats=10 [--step_time_s=0.5]
  python benchmarks/ot.py --host_devices=8 ...   # CPU only: 8 fake devices, to exercise "local"

On CPU, combinations whose predicted time (extrapolated from the previous batch size) exceeds
--cpu_budget_s are skipped with a note on stderr; nothing is skipped on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Growth of the time per call with B (solver cost; the B x B x dim matmul is at most this).
_EXPONENT = {"none": 1.0, "exact": 3.0, "hungarian": 3.0, "sinkhorn": 2.0}


def _csv(kind):
  return lambda s: [kind(v) for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch_sizes", type=_csv(int), default=[64, 128, 256, 512, 1024])
  p.add_argument("--dim", type=int, default=4096, help="flattened latent size (4x32x32)")
  p.add_argument("--methods", type=_csv(str), default=["exact", "hungarian", "sinkhorn"])
  p.add_argument("--scopes", type=_csv(str), default=["local", "global"])
  p.add_argument("--repeats", type=int, default=10, help="timed calls per result")
  p.add_argument("--step_time_s", type=float, default=None, help="train-step time for the share")
  p.add_argument("--sinkhorn_epsilon", type=float, default=0.01)
  p.add_argument("--sinkhorn_iterations", type=int, default=200)
  p.add_argument("--cpu_budget_s", type=float, default=30.0, help="CPU only: skip beyond this")
  p.add_argument(
    "--host_devices", type=int, default=0, help="CPU only: fake host devices (XLA flag; 0 = off)"
  )
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.host_devices:
    # Must be set before jax is imported; affects the CPU platform only.
    flag = f"--xla_force_host_platform_device_count={args.host_devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from lct_jax.core import ot

  def note(msg: str) -> None:
    print(f"[benchmarks/ot] {msg}", file=sys.stderr, flush=True)

  backend = jax.default_backend()
  devices = jax.devices()
  n_dev = len(devices)
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  on_cpu = backend == "cpu"

  methods = list(args.methods)
  if "sinkhorn" in methods:
    try:
      import ott  # noqa: F401
    except ImportError:
      note("ott-jax is not installed: skipping method sinkhorn")
      methods.remove("sinkhorn")

  for method in methods:
    for scope in args.scopes:
      config = ot.OTConfig(
        method=method,
        scope=scope,
        sinkhorn_epsilon=args.sinkhorn_epsilon,
        sinkhorn_iterations=args.sinkhorn_iterations,
      )
      fn = jax.jit(lambda x, n, k, c=config: ot.couple(x, n, k, config=c, mesh=mesh))
      prev = None  # (batch size, seconds per call) of the last measured size
      for b in sorted(args.batch_sizes):
        if b % n_dev:
          note(f"skip {method}/{scope} B={b}: not divisible by {n_dev} devices")
          continue
        if on_cpu and prev is not None:
          predicted = prev[1] * (b / prev[0]) ** _EXPONENT[method] * (args.repeats + 1)
          if predicted > args.cpu_budget_s:
            note(
              f"skip {method}/{scope} B={b} on CPU: ~{predicted:.0f} s predicted "
              f"> --cpu_budget_s={args.cpu_budget_s:g}"
            )
            continue
        rng = np.random.default_rng(b)
        x = jax.device_put((0.5 * rng.standard_normal((b, args.dim))).astype(np.float32), sharding)
        n = jax.device_put(rng.standard_normal((b, args.dim)).astype(np.float32), sharding)
        keys = jax.random.split(jax.random.key(0), args.repeats + 1)
        jax.block_until_ready(fn(x, n, keys[0]))  # compile + warm-up, not timed
        times = []
        for i in range(args.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(x, n, keys[i + 1]))
          times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        prev = (b, med)
        share = None if args.step_time_s is None else med / args.step_time_s
        result = {
          "benchmark": "ot",
          "method": method,
          "scope": scope,
          "batch_size": b,
          "dim": args.dim,
          "devices": n_dev,
          "median_ms": round(med * 1e3, 4),
          "share_of_step": None if share is None else round(share, 6),
          "device_kind": devices[0].device_kind,
          "backend": backend,
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()

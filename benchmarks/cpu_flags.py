"""XLA:CPU against PyTorch (oneDNN) on this CPU, and what XLA's CPU flags change.

Prints one JSON line per measurement.

  python benchmarks/cpu_flags.py                          # conv micro-benchmark, every flag set
  python benchmarks/cpu_flags.py --step --flag_sets=,--xla_cpu_use_xnnpack=true
  python benchmarks/cpu_flags.py --step --torch_step --flag_sets=   # JAX step against PyTorch's

Each XLA flag set runs in a fresh process, since XLA reads XLA_FLAGS once. After warm-up it
times:

* (a) the forward, and forward + backward, of one 3x3 convolution (batch 8, 256 -> 256 channels,
  32x32, float32: the paper network's widest layer);
* (b) with --step, the paper network's full train step at batch 8 (configs/ffhq.py, float32;
  minutes per set).

PyTorch's CPU convolution (oneDNN, NCHW and channels-last) is timed on the same shape in the
parent process, so the ratio XLA / PyTorch is measured in one run on one machine.

With --torch_step a separate process also times the same train step written in PyTorch, NCHW and
channels-last (benchmarks/torch_unet.py: the paper network, loss, RAdam and EMA, checked against
the Flax network by tests/test_torch_reference.py). Each JAX step line gets its ratio to the
faster of the two.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(batch=8, channels=256, size=32)
DEFAULT_FLAG_SETS = [
  "",
  "--xla_cpu_use_thunk_runtime=false",
  "--xla_cpu_use_xnnpack=true",
  "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
  "--xla_cpu_enable_fast_math=true",
]


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def conv_flops(backward: bool) -> float:
  b, c, s = SHAPE["batch"], SHAPE["channels"], SHAPE["size"]
  forward = 2.0 * b * s * s * c * c * 9
  return 3.0 * forward if backward else forward  # + input gradient, weight gradient


def time_jax_conv(repeats: int, backward: bool = True) -> float:
  import jax
  import jax.numpy as jnp
  import numpy as np

  b, c, s = SHAPE["batch"], SHAPE["channels"], SHAPE["size"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, s, s, c), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32) / 48)

  def loss(x, w):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(y * y)

  fn = jax.jit(jax.grad(loss, argnums=(0, 1)) if backward else loss)
  return _median_time(lambda: jax.block_until_ready(fn(x, w)), repeats)


def time_torch_conv(repeats: int, channels_last: bool, backward: bool = True) -> float:
  import torch

  b, c, s = SHAPE["batch"], SHAPE["channels"], SHAPE["size"]
  conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
  x = torch.randn(b, c, s, s, requires_grad=True)
  if channels_last:
    conv = conv.to(memory_format=torch.channels_last)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)

  def run():
    x.grad = None
    conv.zero_grad()
    (conv(x) ** 2).sum().backward()

  def forward():
    with torch.no_grad():
      (conv(x) ** 2).sum()

  return _median_time(run if backward else forward, repeats)


def time_jax_step() -> dict:
  """The paper network's train step (configs/ffhq.py, float32) at batch 8: benchmarks/train_step."""
  from benchmarks import train_step
  from configs import ffhq

  config = ffhq.get_config()
  config.model.dtype = "float32"
  return train_step.run(config, batch_size=8, steps=3, warmup=1)


def time_torch_step(channels_last: bool, steps: int = 3, warmup: int = 1) -> float:
  """Median seconds of the PyTorch train step (benchmarks/torch_unet.py) at batch 8, float32."""
  import numpy as np
  import torch

  from benchmarks import torch_unet
  from configs import ffhq
  from lct_jax import config_lib

  config = ffhq.get_config()
  shape = tuple(config.data.latent_shape)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = torch_unet.from_config(config.model, shape).to(memory_format=fmt)
  optim = config.optim
  step = torch_unet.TrainStep(net, optim.learning_rate, optim.weight_decay, optim.ema_decay)
  rng = np.random.default_rng(0)
  h, w, c = shape
  x = torch.from_numpy(0.5 * rng.standard_normal((8, c, h, w)).astype(np.float32))
  x = x.contiguous(memory_format=fmt)
  times = []
  for i in range(warmup + steps):
    inputs = torch_unet.draw_step_inputs(rng, 8, shape, config_lib.curriculum_config(config))
    inputs["noise"] = inputs["noise"].contiguous(memory_format=fmt)
    t0 = time.perf_counter()
    step(x, **inputs)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def child(flags: str, step: bool, repeats: int) -> None:
  """Runs inside a process whose XLA_FLAGS hold `flags`; prints one JSON line per measurement."""
  import jax

  base = {"flags": flags, "backend": jax.default_backend(), "host_cpus": os.cpu_count()}
  for backward in (False, True):
    t = time_jax_conv(repeats, backward)
    line = dict(base, benchmark="cpu_conv", framework="jax", backward=backward, median_s=t)
    line["gflop_per_s"] = conv_flops(backward) / t / 1e9
    print(json.dumps(line), flush=True)
  if step:
    r = time_jax_step()
    line = dict(base, benchmark="cpu_train_step", framework="jax", config="ffhq", batch_size=8)
    line.update(median_s=r["median_step_s"], min_s=r["min_step_s"])
    line.update(flops=r["flops_per_step"])
    print(json.dumps(line), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--flag_sets", default=None, help="comma-separated XLA flag sets ('' = none)")
  p.add_argument("--step", action="store_true", help="also time the paper train step per set")
  p.add_argument(
    "--torch_step", action="store_true", help="time the PyTorch train step (torch_unet.py) too"
  )
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--torch_child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.torch_child:
    for layout in ("nchw", "channels_last"):
      t = time_torch_step(layout == "channels_last")
      line = dict(benchmark="cpu_train_step", framework=f"torch-{layout}", config="ffhq")
      line.update(batch_size=8, median_s=t, torch_threads=__import__("torch").get_num_threads())
      print(json.dumps(line), flush=True)
    return
  if args.child is not None:
    child(args.child, args.step, args.repeats)
    return
  sets = DEFAULT_FLAG_SETS if args.flag_sets is None else args.flag_sets.split(",")
  best_torch = {}  # backward -> fastest PyTorch layout's time
  for backward in (False, True):
    for layout in ("nchw", "channels_last"):
      t = time_torch_conv(args.repeats, layout == "channels_last", backward)
      best_torch[backward] = min(t, best_torch.get(backward, t))
      line = dict(benchmark="cpu_conv", framework=f"torch-{layout}", backward=backward, median_s=t)
      line.update(gflop_per_s=conv_flops(backward) / t / 1e9, host_cpus=os.cpu_count())
      line["torch_threads"] = __import__("torch").get_num_threads()
      print(json.dumps(line), flush=True)
  torch_step_s = None
  if args.torch_step:  # in a process of its own, like each JAX step: nothing of it stays around
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--torch_child"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
      print(
        json.dumps(dict(benchmark="cpu_train_step", framework="torch", error=out.stderr[-500:]))
      )
    for raw in out.stdout.splitlines():
      if raw.startswith("{"):
        line = json.loads(raw)
        torch_step_s = min(line["median_s"], torch_step_s or line["median_s"])
        print(json.dumps(line), flush=True)
  for flags in sets:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=ROOT)
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      f"--child={flags}",
      f"--repeats={args.repeats}",
    ]
    if args.step:
      cmd.append("--step")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
      print(json.dumps(dict(benchmark="cpu_conv", flags=flags, error=out.stderr[-500:])))
      continue
    for raw in out.stdout.splitlines():
      if raw.startswith("{"):
        line = json.loads(raw)
        if line["benchmark"] == "cpu_conv":
          line["ratio_to_best_torch"] = line["median_s"] / best_torch[line["backward"]]
        elif torch_step_s:
          line["ratio_to_torch_step"] = line["median_s"] / torch_step_s
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()

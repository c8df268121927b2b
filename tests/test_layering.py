"""A lower layer never imports a higher one (docs/design.md, Layers).

The core layer imports no TensorFlow, tfds, diffusers, clu, grain or orbax, checked in a fresh
process. The imports between lct_jax's own layers are read from the source with `ast`, imports
inside functions included, so a lazy import cannot hide a violation.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

FORBIDDEN = ("tensorflow", "tensorflow_datasets", "diffusers", "clu", "grain", "orbax")
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lct_jax"
# Subpackages, each its own layer; any other name under lct_jax is a top-level module.
SUBPACKAGES = ("core", "io", "fid", "tools")
BINARIES = ("main.py", "evaluate.py", "encode.py")


def test_core_imports_nothing_from_higher_layers():
  code = (
    "import sys, pkgutil, importlib, lct_jax.core as c\n"
    "for m in pkgutil.walk_packages(c.__path__, 'lct_jax.core.'): importlib.import_module(m.name)\n"
    "import lct_jax.core.ot as ot, jax.numpy as jnp, jax\n"
    "x = jnp.ones((4, 3))\n"
    "ot.assignment(x, x, jax.random.PRNGKey(0), config=ot.OTConfig('sinkhorn'))\n"
    f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
    "print(','.join(bad))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lct_jax_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) for every lct_jax module that the file imports, at any depth of its code.

  `from lct_jax import X` gives "lct_jax.X", `from lct_jax.X import Y` and `import lct_jax.X`
  give "lct_jax.X"; relative imports are resolved against the file's package.
  """
  package = _module_name(path).split(".")
  if path.name != "__init__.py":
    package = package[:-1]
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
      if base == "lct_jax":
        found += [(node.lineno, f"lct_jax.{alias.name}") for alias in node.names]
      else:
        found.append((node.lineno, base))
  return sorted((line, name) for line, name in found if name.split(".")[0] == "lct_jax")


def layer(module: str) -> str:
  """The layer of an lct_jax module: a subpackage's name, "top" for a top-level module, or ""
  for the package itself."""
  parts = module.split(".")
  if len(parts) == 1:
    return ""
  return parts[1] if parts[1] in SUBPACKAGES else "top"


def violations(files, forbidden_layers) -> list[str]:
  """One "path:line imports module" for each import of a module in `forbidden_layers`."""
  return [
    f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
    for path in files
    for line, module in lct_jax_imports(path)
    if layer(module) in forbidden_layers
  ]


def sources(*subpackages: str) -> list[pathlib.Path]:
  files = [p for sub in subpackages for p in sorted((PACKAGE / sub).rglob("*.py"))]
  assert files, f"no sources under {subpackages}"
  return files


def library_sources() -> list[pathlib.Path]:
  """Every module of lct_jax except the tools and the binaries."""
  relative = [p.relative_to(PACKAGE) for p in sorted(PACKAGE.rglob("*.py"))]
  return [PACKAGE / p for p in relative if p.parts[0] != "tools" and p.as_posix() not in BINARIES]


@pytest.mark.parametrize(
  "snippet, expected",
  [
    ("from lct_jax import config_lib, image_files", ["lct_jax.config_lib", "lct_jax.image_files"]),
    ("import lct_jax.training as t", ["lct_jax.training"]),
    ("def f():\n  from lct_jax.schema import ConfigError", ["lct_jax.schema"]),
    ("from lct_jax.io import autoencoder", ["lct_jax.io"]),
    ("from .. import scoring", ["lct_jax.scoring"]),
    ("from ..tools import fid_stats", ["lct_jax.tools"]),
    ("from . import stats", ["lct_jax.fid"]),
    ("import numpy, jax.numpy as jnp", []),
  ],
)
def test_import_reader_sees_every_form(tmp_path, monkeypatch, snippet, expected):
  """The reader behind the static checks finds each import form, lazy and relative ones too."""
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "lct_jax")
  path = tmp_path / "lct_jax" / "fid" / "mod.py"
  path.parent.mkdir(parents=True)
  path.write_text(snippet + "\n")
  assert [m for _, m in lct_jax_imports(path)] == expected


def test_io_and_fid_import_no_top_level_module():
  """lct_jax.io and lct_jax.fid use none of lct_jax's top-level modules (config_lib, training,
  evaluation, scoring, image_files, analyze, schema, ...)."""
  bad = violations(sources("io", "fid"), {"top"})
  assert not bad, "io/fid import from a higher layer:\n" + "\n".join(bad)


def test_library_imports_no_tools():
  """Only the binaries and the tools themselves import lct_jax.tools."""
  bad = violations(library_sources(), {"tools"})
  assert not bad, "library modules import lct_jax.tools:\n" + "\n".join(bad)


def test_core_imports_no_other_lct_jax_layer():
  """lct_jax.core imports nothing of io, fid, the tools or the top-level modules."""
  bad = violations(sources("core"), {"io", "fid", "tools", "top"})
  assert not bad, "core imports from a higher layer:\n" + "\n".join(bad)

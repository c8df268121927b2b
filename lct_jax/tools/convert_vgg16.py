"""`python -m lct_jax.tools.convert_vgg16 --input=FILE --output=vgg16.npz`.

Converts VGG16 weights to the .npz that `lct_jax.fid.vgg` loads (precision/recall features),
reading the PyTorch file with `lct_jax.fid.torch_files` (no torch needed). Two layouts are
understood, told apart by the tensor names inside the file (not by its name):

* torchvision's state dict `vgg16-397923af.pth` (features.{0,2,5,7,10,12,14,17,19,21,24,26,28}
  convs, classifier.0 and classifier.3 = fc1 and fc2; classifier.6 is dropped): resize mode
  "torchvision";
* NVIDIA's StyleGAN2-ADA `vgg16.pt`, a TorchScript file whose state dict holds layers.conv1 ..
  layers.conv13 and layers.fc1, fc2 (layers.fc3 and the LPIPS heads layers.lpips0..4 are
  dropped): resize mode "tf1". This is the paper's feature network. The tests do not have the
  real file: they convert a file of the same layout that they write themselves. Reading the real
  file as a plain VGG16 with the "tf1" resize and ImageNet normalisation is unverified (see
  `lct_jax.fid.vgg`).

The output records the source's sha256, its layout, the resize mode and a content hash of the
converted weights, inside the .npz and in a JSON beside it; both are written atomically.
"""

import os
import sys
from collections.abc import Mapping

import numpy as np
from absl import app, flags

from lct_jax.fid import inception_weights, npz_io, vgg
from lct_jax.io import job_logging

# torchvision's nn.Sequential indices of the 13 convs in `features`.
TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
NUM_CONVS = len(TORCHVISION_CONVS)


def _torchvision_names() -> dict[str, str]:
  names = {f"features.{j}": f"conv{i}" for i, j in enumerate(TORCHVISION_CONVS, 1)}
  return {**names, "classifier.0": "fc1", "classifier.3": "fc2"}


def _stylegan_names() -> dict[str, str]:
  names = {f"layers.conv{i}": f"conv{i}" for i in range(1, NUM_CONVS + 1)}
  return {**names, "layers.fc1": "fc1", "layers.fc2": "fc2"}


# layout -> (source module -> Flax module, resize mode). Other tensors (torchvision's
# classifier.6, NVIDIA's layers.fc3 and layers.lpips0..4) are dropped and listed in the metadata.
LAYOUTS = {
  "torchvision": (_torchvision_names(), "torchvision"),
  "stylegan2-ada": (_stylegan_names(), "tf1"),
}


def detect_layout(state: Mapping[str, np.ndarray], src: str = "") -> str:
  """ "torchvision" or "stylegan2-ada", from the tensor names.

  Raises:
    ValueError: neither layout's tensors are all present; names the file and the keys found.
  """
  for layout, (names, _) in LAYOUTS.items():
    if all(f"{m}.{leaf}" in state for m in names for leaf in ("weight", "bias")):
      return layout
  keys = sorted(state)
  raise ValueError(
    f"{src or 'input'}: not a VGG16 file this converter knows. Expected torchvision's "
    "vgg16-397923af.pth (features.0.weight ... features.28.bias, classifier.0/3.weight/bias) or "
    "NVIDIA's StyleGAN2-ADA vgg16.pt (layers.conv1.weight ... layers.conv13.bias, "
    f"layers.fc1/fc2.weight/bias); found {len(keys)} keys: {keys[:20]}"
    + (" ..." if len(keys) > 20 else "")
  )


def convert_state(state: Mapping[str, np.ndarray], layout: str) -> tuple[dict, list[str]]:
  """Source tensors -> flat Flax variables, and the names of the tensors that were dropped.

  Conv weights (O, I, kh, kw) become kernels (kh, kw, I, O); linear weights (out, in) become
  kernels (in, out), their rows staying in PyTorch's (C, H, W) flatten order (the Flax module
  flattens the same way). Shapes are checked afterwards (`vgg.check_variables`).
  """
  names, _ = LAYOUTS[layout]
  flat, dropped = {}, []
  for key, value in state.items():
    module, _, leaf = key.rpartition(".")
    value = np.asarray(value, np.float32)
    if module in names and leaf in ("weight", "bias"):
      base = f"params/{names[module]}"
      if leaf == "bias":
        flat[f"{base}/bias"] = value
      elif value.ndim == 4:
        flat[f"{base}/kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
      else:
        flat[f"{base}/kernel"] = np.ascontiguousarray(value.T)
    else:
      dropped.append(key)
  return flat, sorted(dropped)


def convert(src: str, out: str) -> dict:
  """Converts `src` to the .npz `out` (plus `out` with .json) and returns the recorded metadata.

  Args:
    src: torchvision .pth state dict or NVIDIA's TorchScript vgg16.pt.
    out: destination .npz.

  Returns:
    The metadata written into the .npz and the JSON beside it.
  """
  src, out = os.path.abspath(src), os.path.abspath(out)
  if not os.path.isfile(src):
    raise FileNotFoundError(f"--input={src}: no such file ({vgg.SOURCES})")
  sha256 = npz_io.file_digest(src)
  known = inception_weights.check_known_hashes(src, sha256)
  kind, state = inception_weights.read_torch_state(src)
  layout = detect_layout(state, src)
  flat, dropped = convert_state(state, layout)
  try:
    vgg.check_variables(flat)
  except ValueError as e:
    raise ValueError(f"{src} ({layout} layout): {e}") from None
  meta = {
    "source_path": src,
    "source_sha256": sha256,
    "source_kind": kind,
    "source_layout": layout,
    "source_hash_verified": known,
    "dropped_tensors": dropped,
    "resize": LAYOUTS[layout][1],
    "converter": "lct_jax.tools.convert_vgg16 (PyTorch files read by lct_jax.fid.torch_files)",
  }
  return vgg.save_weights(out, flat, meta)


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("input", None, f"VGG16 weights: {vgg.SOURCES}.")
  flags.DEFINE_string("output", None, "Output .npz (the eval job's eval.vgg16_weights).")
  flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
  del argv
  meta = convert(flags.FLAGS.input, flags.FLAGS.output)
  sys.stdout.write(
    f"wrote {os.path.abspath(flags.FLAGS.output)}\n  source {meta['source_path']} "
    f"({meta['source_layout']}) sha256 {meta['source_sha256']}\n  resize {meta['resize']}, "
    f"weights hash {meta['params_sha256']}\n"
  )


if __name__ == "__main__":
  define_flags()
  job_logging.run(main, "lct_jax.tools.convert_vgg16")

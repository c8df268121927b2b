"""The VGG16 feature network for improved precision/recall, in Flax: uint8 NHWC -> fc2 features.

The paper's precision/recall (docs/method.md §7) is StyleGAN2-ADA's `pr50k3` metric on VGG16
features: the 4096-d output of the second fully connected layer after its ReLU (the `feature`
tensor of NVIDIA's `metrics/vgg16.pt`, before fc3). This module owns:

* the network: 13 3x3 convs with ReLU in 5 blocks, each closed by a 2x2 max pool; an adaptive
  average pool to 7x7 (the identity at 224x224); the flatten in PyTorch's NCHW order; fc1 and
  fc2 with ReLU;
* its input pipeline;
* loading the .npz that `python -m lct_jax.tools.convert_vgg16` writes.

Torch is never imported here.

Input pipeline: uint8 RGB -> bilinear resize to 224x224 (on the 0..255 values) -> x/255 ->
(x - ImageNet mean) / ImageNet std, in float32; convs and matmuls at precision HIGHEST. The resize
mode is recorded with the weights by the converter:

* "torchvision" (torchvision's `vgg16-397923af.pth`): half-pixel centres, no antialias, equal to
  `torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`;
* "tf1" (NVIDIA's `vgg16.pt`): TF1's legacy `resize_bilinear(align_corners=False,
  half_pixel_centers=False)`, source coordinate = dst_index * in / out.

Unverified: this reading of NVIDIA's vgg16.pt is not compared with its TorchScript forward (the
file is not part of the test setup). The reading is a plain VGG16 fed through the "tf1" resize
and the [0, 1] ImageNet normalisation, flattened in NCHW order. It follows a third-party PyTorch
port that loads vgg16.pt's tensors into a plain VGG16 and resizes like TF1. The network and both
resizes are tested against torchvision, torch and TensorFlow.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lct_jax.fid import inception, npz_io, preprocess, stats

EXTRACTOR = "vgg16"
FEATURE_DIM = 4096
INPUT_SIZE = 224
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
POOLED_HW = (7, 7)
_NORMALIZE = "/255 -> (x - ImageNet mean (0.485, 0.456, 0.406)) / std (0.229, 0.224, 0.225)"
# Recorded with every feature file; features are comparable only if these strings are equal.
PREPROCESSING = {
  "torchvision": "uint8 RGB -> bilinear resize to 224x224 (torch interpolate, align_corners="
  f"False, no antialias; resize mode torchvision) -> {_NORMALIZE}",
  "tf1": "uint8 RGB -> bilinear resize to 224x224 (TF1 resize_bilinear, align_corners=False, "
  f"half_pixel_centers=False; resize mode tf1) -> {_NORMALIZE}",
}
RESIZE_MODES = tuple(PREPROCESSING)
SOURCES = (
  "NVIDIA's StyleGAN2-ADA vgg16.pt (the paper's features: https://nvlabs-fi-cdn.nvidia.com/"
  "stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt) or torchvision's vgg16-397923af.pth "
  "(https://download.pytorch.org/models/vgg16-397923af.pth)"
)


def conversion_command(out: str) -> str:
  """The shell command that writes the weights file `out` (no torch needed)."""
  return f"python -m lct_jax.tools.convert_vgg16 --input=VGG16_FILE --output={out}"


# ----------------------------------------------------------------------------------------------
# Input pipeline.


def _tf1_linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
  """Source indices and weights of TF1's legacy 1-D linear resampling (no half-pixel centres).

  Mirrors TF's float32 arithmetic: scale = float(in) / out, src = float(dst) * scale (one
  rounding each), lower = floor(src), upper = min(ceil(src), in - 1), lerp = src - floor(src).
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.arange(out_size, dtype=f32) * scale
  lower = np.floor(src)
  i0 = np.minimum(lower.astype(np.int64), in_size - 1)
  i1 = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  return i0.astype(np.int32), i1.astype(np.int32), (src - lower).astype(f32)


def resize_bilinear_tf1(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC floats, equal to TF1's `resize_bilinear(align_corners=False,
  half_pixel_centers=False)`: along W on the two source rows, then along H, as a + (b - a) * t.

  Args:
    x: float array (B, H, W, C).
    out_hw: (height, width) of the output.

  Returns:
    float array (B, out_h, out_w, C) of x's dtype.
  """
  _, h, w, _ = x.shape
  if (h, w) == tuple(out_hw):
    return x  # src = dst exactly: the identity.
  hi0, hi1, ht = _tf1_linear_taps(h, out_hw[0])
  wi0, wi1, wt = _tf1_linear_taps(w, out_hw[1])
  wt = jnp.asarray(wt, x.dtype)[None, None, :, None]
  ht = jnp.asarray(ht, x.dtype)[None, :, None, None]

  def along_w(rows: jax.Array) -> jax.Array:
    left = rows[:, :, wi0]
    return left + (rows[:, :, wi1] - left) * wt

  top = along_w(x[:, hi0])
  return top + (along_w(x[:, hi1]) - top) * ht


def resize(x: jax.Array, mode: str, out_hw: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
  """Bilinear resize of NHWC floats in the given mode ("torchvision" or "tf1")."""
  if mode == "torchvision":
    return preprocess.resize_bilinear_torch(x, out_hw)
  if mode == "tf1":
    return resize_bilinear_tf1(x, out_hw)
  raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def preprocess_images(images: jax.Array, mode: str) -> jax.Array:
  """uint8 NHWC RGB -> float32 (B, 224, 224, 3): resize (`mode`), /255, ImageNet mean/std."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images (B, H, W, 3), got shape {images.shape}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype} (map to [0, 255] uint8 first)")
  x = resize(images.astype(jnp.float32), mode)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x / 255.0 - mean) / std


# ----------------------------------------------------------------------------------------------
# Network. Convs conv1..conv13, dense layers fc1, fc2 (NVIDIA's names, without "layers.").


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """torch's AdaptiveAvgPool2d on NHWC: output bin i averages input rows floor(i * in / out) to
  ceil((i + 1) * in / out) - 1 (bins overlap or repeat when in is not a multiple of out)."""
  for axis, out in zip((1, 2), out_hw):
    size = x.shape[axis]
    if size == out:
      continue
    bins = [
      jnp.mean(
        jax.lax.slice_in_dim(x, (i * size) // out, -(-((i + 1) * size) // out), axis=axis),
        axis=axis,
        keepdims=True,
      )
      for i in range(out)
    ]
    x = jnp.concatenate(bins, axis=axis)
  return x


class Vgg16(nn.Module):
  """VGG16 up to fc2 + ReLU: (B, H, W, 3) normalised floats -> (B, 4096).

  Attributes:
    precision: conv/matmul precision; "highest" keeps float32 accuracy on GPUs/TPUs.
  """

  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    i = 0
    for block in BLOCKS:
      for channels in block:
        i += 1
        conv = nn.Conv(
          channels, (3, 3), padding=((1, 1), (1, 1)), precision=self.precision, name=f"conv{i}"
        )
        x = nn.relu(conv(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = adaptive_avg_pool(x, POOLED_HW)
    # PyTorch flattens (C, H, W): fc1's converted kernel rows are in that order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(FEATURE_DIM, precision=self.precision, name="fc1")(x))
    return nn.relu(nn.Dense(FEATURE_DIM, precision=self.precision, name="fc2")(x))


# ----------------------------------------------------------------------------------------------
# Weights: flat .npz keys "params/conv1/kernel" (3, 3, I, O), "params/fc1/kernel" (in, out), ...


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat variable names and shapes of the model (from an abstract init, no compute)."""
  shapes = jax.eval_shape(
    Vgg16().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  )
  return {k: tuple(v.shape) for k, v in inception.flatten_variables(shapes).items()}


def check_variables(flat: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError unless `flat` holds exactly the model's variables with the right shapes."""
  expected = expected_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [(k, flat[k].shape, expected[k]) for k in expected if k in flat]
  wrong = [w for w in wrong if tuple(w[1]) != w[2]]
  if missing or extra or wrong:
    raise ValueError(
      f"weights do not fit VGG16: missing {missing[:5]}, unexpected {extra[:5]}, "
      f"wrong shapes {wrong[:5]}"
    )


def save_weights(path: str, flat: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict:
  """Writes converted weights (.npz, plus the metadata as JSON beside it) atomically.

  Args:
    path: destination .npz.
    flat: flat variables (float32), checked against the model.
    meta: provenance; must hold "resize" (one of RESIZE_MODES).

  Returns:
    The metadata written, with format_version and params_sha256 added.
  """
  if meta.get("resize") not in RESIZE_MODES:
    raise ValueError(f"meta['resize']={meta.get('resize')!r}: expected one of {RESIZE_MODES}")
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  check_variables(flat)
  meta = {
    "format_version": FORMAT_VERSION,
    "model": "VGG16 fc2 after ReLU, 4096-d",
    **meta,
    "params_sha256": inception.params_sha256(flat),
  }
  npz_io.save_npz_atomic(path, flat, meta)
  npz_io.save_json_atomic(os.path.splitext(path)[0] + ".json", meta)
  return meta


@dataclasses.dataclass(frozen=True)
class Vgg16Features:
  """Loaded VGG16: the module, its variables, the weights' identity and resize mode.

  Attributes:
    module: the Flax module (apply with `module.apply(variables, x)` on preprocessed input).
    variables: {"params": ...} as jax arrays.
    weights_sha256: content hash of the weights (`inception.params_sha256`), recorded in features.
    resize: "torchvision" or "tf1".
    meta: the converter's metadata (source file, its sha256, format, ...).
  """

  module: Vgg16
  variables: Any
  weights_sha256: str
  resize: str
  meta: Mapping[str, Any]

  extractor = EXTRACTOR
  feature_dim = FEATURE_DIM

  @property
  def preprocessing(self) -> str:
    return PREPROCESSING[self.resize]

  def stats_meta(self, image_size: str = "", num_images: int = 0, source: str = ""):
    """The provenance a feature file made by this network records (`stats.StatsMeta`)."""
    return stats.StatsMeta(
      self.weights_sha256,
      self.preprocessing,
      FEATURE_DIM,
      image_size,
      num_images,
      source,
      extractor=EXTRACTOR,
    )

  def apply(self, variables: Any, images: jax.Array) -> jax.Array:
    """Pure function: uint8 NHWC images -> float32 (B, 4096) features (jit it freely)."""
    return self.module.apply(variables, preprocess_images(images, self.resize))

  @functools.cached_property
  def _jitted(self) -> Callable[[Any, jax.Array], jax.Array]:
    return jax.jit(self.apply)

  def features(self, images: jax.Array | np.ndarray) -> jax.Array:
    """fc2 features of a uint8 NHWC batch (jitted; one compile per input shape and sharding)."""
    return self._jitted(self.variables, jnp.asarray(images))


def load_vgg16(path: str, precision: str = "highest") -> Vgg16Features:
  """Loads converted VGG16 weights from an .npz (no torch needed).

  Args:
    path: the .npz written by `python -m lct_jax.tools.convert_vgg16`.
    precision: conv/matmul precision of the module.

  Returns:
    A Vgg16Features.

  Raises:
    inception.WeightsNotFoundError: the file does not exist; the message gives the conversion
      command.
    ValueError: not a complete set of VGG16 weights, no recorded resize mode, or a content hash
      that differs from the one recorded at conversion.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise inception.WeightsNotFoundError(
      f"VGG16 weights not found at {path}. Convert them once (no torch needed) with:\n  "
      f"{conversion_command(path)}\nwhere VGG16_FILE is {SOURCES}."
    )
  flat, meta = npz_io.load_float32_npz(path)
  check_variables(flat)
  if meta.get("resize") not in RESIZE_MODES:
    raise ValueError(
      f"{path}: no resize mode recorded (meta {json.dumps(meta)[:200]}); convert the weights "
      "with python -m lct_jax.tools.convert_vgg16"
    )
  digest = inception.params_sha256(flat)
  if meta.get("params_sha256") not in (None, digest):
    raise ValueError(f"{path}: weights hash {digest} differs from the recorded one")
  variables = jax.tree.map(jnp.asarray, inception.unflatten_variables(flat))
  return Vgg16Features(Vgg16(precision=precision), variables, digest, meta["resize"], meta)

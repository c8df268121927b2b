"""TAESD-family tiny autoencoders (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) in Flax, without torch.

This module owns the tiny autoencoder's network, converting its PyTorch state dicts (read with
`lct_jax.fid.torch_files`, no torch) to Flax parameters, and loading a folder that holds
`*encoder.pth` and `*decoder.pth`. `TAEF2_FOLDER` is the TAEF2 weights (FLUX.2 latent space, 32
channels) shipped with lct_jax; see lct_jax/assets/taef2/README.md for their source and licence.

The network, as the state dicts' keys index it (every conv 3x3 with padding 1 unless noted):

* encoder: 0 conv(3->W), 1 Block, then three times [conv stride 2 no bias, 3 Blocks] (2-13),
  14 conv(W->C);
* decoder: 0 tanh(z / 3) * 3, 1 conv(C->W), 2 ReLU, then three times [3 Blocks, 2x nearest
  upsample, conv no bias] (3-17), 18 Block, 19 conv(W->3);
* Block: x <- x + pool(x) where the Block has a pool branch, then ReLU(conv(ReLU(conv(ReLU(conv(
  x))))) + x), the convs with bias. The pool branch (TAEF2's last three encoder and first three
  decoder Blocks) is conv1x1(W->P, no bias), GroupNorm(4 groups, eps 1e-5), ReLU,
  conv1x1(P->W, no bias).

W (64 in TAEF2), C (32 in TAEF2; 4 or 16 in the plain TAESD, TAESDXL, TAESD3 and TAEF1 files), P
and which Blocks have the pool branch are read from the state dict; every other tensor must then
be present with the shape this layout gives it, and a state dict that does not fit is refused
naming the tensor. The decoder's images are in [0, 1]; `TinyAutoencoder` maps them (and the
encoder's input) to and from the [-1, 1] of `lct_jax.io.autoencoder`. Latents are used as the
network gives them (scale factor 1).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lct_jax.fid import npz_io, torch_files
from lct_jax.io.autoencoder import Autoencoder, params_hash

# The TAEF2 weights shipped with lct_jax (taef2_encoder.pth, taef2_decoder.pth, SHA256SUMS).
TAEF2_FOLDER = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "taef2"
)
SUMS_NAME = "SHA256SUMS"
ENCODER_SUFFIX = "encoder.pth"
DECODER_SUFFIX = "decoder.pth"
DEFAULT_KIND = "taesd"  # the identity's kind when the files are plainly encoder.pth / decoder.pth

IMAGE_CHANNELS = 3
GROUP_NORM_GROUPS = 4
GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
LATENT_CLAMP = 3.0  # decoder input: tanh(z / 3) * 3

# (state-dict index, kind) of each layer. conv_in / conv_out: 3x3 with bias from / to the outer
# channels; down: 3x3 stride 2 no bias; upconv: 3x3 no bias; up: 2x nearest upsampling.
ENCODER_LAYERS: tuple[tuple[int, str], ...] = (
  ((0, "conv_in"), (1, "block"))
  + tuple((i, "down" if i % 4 == 2 else "block") for i in range(2, 14))
  + ((14, "conv_out"),)
)
DECODER_LAYERS: tuple[tuple[int, str], ...] = (
  ((0, "clamp"), (1, "conv_in"), (2, "relu"))
  + tuple((i, ("block", "block", "block", "up", "upconv")[(i - 3) % 5]) for i in range(3, 18))
  + ((18, "block"), (19, "conv_out"))
)

# Compute dtype: float32 by default; every weight is cast to float32 when converted (the files are
# fp16). Measured on a 2-core CPU (busy with other work), encode + decode of 8 images at 256x256:
# float32 6.9 s, float16 compute 7.6 s (slower: XLA's CPU convolutions are fastest in float32),
# bfloat16 6.7 s; so reduced precision is not worth it there. Not measured on an accelerator; the
# `dtype` argument sets the compute dtype of the convolutions (GroupNorm stays float32).


@dataclasses.dataclass(frozen=True)
class Layout:
  """What varies between TAESD-family state dicts of one direction (encoder or decoder).

  Attributes:
    width: W, the channels inside the network.
    latent_channels: C of the latents.
    pool_blocks: state-dict indices of the Blocks that have the pool branch.
    pool_width: P, the channels inside the pool branch (4 W where no Block has one).
  """

  width: int
  latent_channels: int
  pool_blocks: tuple[int, ...] = ()
  pool_width: int = 256


class Conv(nn.Module):
  """Conv k x k, stride s, zero padding k // 2 on every side (torch's padding=k//2), NHWC/HWIO.

  Explicit padding, not "SAME": for a stride-2 conv on an even size, SAME pads (0, 1) where torch
  pads (1, 1).
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.stride, self.kernel_size // 2
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32
    )
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      window_strides=(s, s),
      padding=((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
        self.dtype
      )
    return y


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on NHWC: per sample and group, (x - mean) / sqrt(var + eps), in float32,
  with the two-pass (not E[x^2] - E[x]^2) variance; then the per-channel affine."""

  groups: int = GROUP_NORM_GROUPS
  epsilon: float = GROUP_NORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    g = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.groups, c // self.groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = g.mean(axis=axes, keepdims=True)
    var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


class Block(nn.Module):
  """The residual Block: the optional pool branch added first, then three convs + identity."""

  width: int
  pool_width: int = 0  # 0: no pool branch
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool_width:
      h = Conv(self.pool_width, 1, use_bias=False, dtype=self.dtype, name="pool_0")(x)
      h = nn.relu(GroupNorm(name="pool_1")(h))
      x = x + Conv(self.width, 1, use_bias=False, dtype=self.dtype, name="pool_3")(h)
    h = nn.relu(Conv(self.width, dtype=self.dtype, name="conv_0")(x))
    h = nn.relu(Conv(self.width, dtype=self.dtype, name="conv_2")(h))
    h = Conv(self.width, dtype=self.dtype, name="conv_4")(h)
    return nn.relu(h + x)


def _run_layers(
  layers: Sequence[tuple[int, str]], layout: Layout, out_channels: int, dtype: Any, x: jax.Array
) -> jax.Array:
  """Applies `layers` in order; called inside a compact method, so the modules are its own."""
  w = layout.width
  for i, kind in layers:
    if kind == "clamp":
      x = jnp.tanh(x / LATENT_CLAMP) * LATENT_CLAMP
    elif kind == "relu":
      x = nn.relu(x)
    elif kind == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    elif kind == "block":
      pool = layout.pool_width if i in layout.pool_blocks else 0
      x = Block(w, pool, dtype=dtype, name=f"block_{i}")(x)
    else:
      features = out_channels if kind == "conv_out" else w
      stride = 2 if kind == "down" else 1
      use_bias = kind in ("conv_in", "conv_out")
      x = Conv(features, 3, stride, use_bias, dtype=dtype, name=f"conv_{i}")(x)
  return x.astype(jnp.float32)


class TinyEncoder(nn.Module):
  """Images (B, H, W, 3) in [0, 1] -> latents (B, H/8, W/8, C), float32."""

  layout: Layout
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    return _run_layers(ENCODER_LAYERS, self.layout, self.layout.latent_channels, self.dtype, images)


class TinyDecoder(nn.Module):
  """Latents (B, h, w, C) -> images (B, 8h, 8w, 3), about [0, 1] (not clamped), float32."""

  layout: Layout
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    return _run_layers(DECODER_LAYERS, self.layout, IMAGE_CHANNELS, self.dtype, latents)


def _layers(part: str) -> tuple[tuple[int, str], ...]:
  if part not in ("encoder", "decoder"):
    raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
  return ENCODER_LAYERS if part == "encoder" else DECODER_LAYERS


def expected_shapes(layout: Layout, part: str) -> dict[str, tuple[int, ...]]:
  """The PyTorch state dict's tensor names and shapes (OIHW convs) for `layout`, in layer order.

  Args:
    layout: the layout.
    part: "encoder" or "decoder".

  Returns:
    name -> shape.
  """
  w, c, p = layout.width, layout.latent_channels, layout.pool_width
  outer_in, outer_out = (IMAGE_CHANNELS, c) if part == "encoder" else (c, IMAGE_CHANNELS)
  shapes: dict[str, tuple[int, ...]] = {}
  for i, kind in _layers(part):
    if kind == "conv_in":
      shapes.update({f"{i}.weight": (w, outer_in, 3, 3), f"{i}.bias": (w,)})
    elif kind == "conv_out":
      shapes.update({f"{i}.weight": (outer_out, w, 3, 3), f"{i}.bias": (outer_out,)})
    elif kind in ("down", "upconv"):
      shapes[f"{i}.weight"] = (w, w, 3, 3)
    elif kind == "block":
      for k in (0, 2, 4):
        shapes.update({f"{i}.conv.{k}.weight": (w, w, 3, 3), f"{i}.conv.{k}.bias": (w,)})
      if i in layout.pool_blocks:
        shapes[f"{i}.pool.0.weight"] = (p, w, 1, 1)
        shapes.update({f"{i}.pool.1.weight": (p,), f"{i}.pool.1.bias": (p,)})
        shapes[f"{i}.pool.3.weight"] = (w, p, 1, 1)
  return shapes


def _refuse(source: str, part: str, problems: list[str]) -> ValueError:
  shown = problems[:8] + ([f"... {len(problems) - 8} more"] if len(problems) > 8 else [])
  return ValueError(
    f"{source} is not a TAESD-family {part} state dict: " + "; ".join(shown) + ". See "
    "lct_jax/io/taesd.py for the layout it must have."
  )


def read_layout(state_dict: Mapping[str, np.ndarray], part: str, source: str = "") -> Layout:
  """Reads W, C and the pool Blocks from a state dict and checks every tensor against them.

  Args:
    state_dict: tensor name -> array, as `torch_files.load_state_dict` gives it.
    part: "encoder" or "decoder".
    source: what to call the state dict in errors (its file).

  Returns:
    The layout.

  Raises:
    ValueError: a tensor is missing, unexpected, of the wrong shape or not floating point; the
      message names each such tensor.
  """
  source = source or f"the {part} state dict"
  layers = _layers(part)
  conv_in = next(i for i, kind in layers if kind == "conv_in")
  conv_out = next(i for i, kind in layers if kind == "conv_out")
  for key in (f"{conv_in}.weight", f"{conv_out}.weight"):
    if key not in state_dict:
      raise _refuse(source, part, [f"missing tensor {key!r}"])
    if np.ndim(state_dict[key]) != 4:
      shape = tuple(np.shape(state_dict[key]))
      raise _refuse(source, part, [f"tensor {key!r} has shape {shape}, expected a 4-d conv"])
  width = int(np.shape(state_dict[f"{conv_in}.weight"])[0])
  if part == "encoder":
    latent = int(np.shape(state_dict[f"{conv_out}.weight"])[0])
  else:
    latent = int(np.shape(state_dict[f"{conv_in}.weight"])[1])
  blocks = [i for i, kind in layers if kind == "block"]
  pool_blocks = tuple(i for i in blocks if any(k.startswith(f"{i}.pool.") for k in state_dict))
  pool_width = 4 * width
  if pool_blocks:
    key = f"{pool_blocks[0]}.pool.0.weight"
    if key in state_dict and np.ndim(state_dict[key]) == 4:
      pool_width = int(np.shape(state_dict[key])[0])
    if pool_width % GROUP_NORM_GROUPS:
      raise _refuse(
        source,
        part,
        [f"tensor {key!r} has {pool_width} channels, not a multiple of {GROUP_NORM_GROUPS}"],
      )
  layout = Layout(width, latent, pool_blocks, pool_width)
  expected = expected_shapes(layout, part)
  problems = [
    f"missing tensor {k!r} of shape {s}" for k, s in expected.items() if k not in state_dict
  ]
  problems += [
    f"unexpected tensor {k!r} of shape {tuple(np.shape(v))}"
    for k, v in state_dict.items()
    if k not in expected
  ]
  problems += [
    f"tensor {k!r} has shape {tuple(np.shape(state_dict[k]))}, expected {s}"
    for k, s in expected.items()
    if k in state_dict and tuple(np.shape(state_dict[k])) != s
  ]
  problems += [
    f"tensor {k!r} is {np.asarray(v).dtype}, not floating point"
    for k, v in state_dict.items()
    if k in expected and not np.issubdtype(np.asarray(v).dtype, np.floating)
  ]
  if problems:
    raise _refuse(source, part, problems)
  return layout


def _conv_params(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  # OIHW -> HWIO
  kernel = np.asarray(state_dict[f"{prefix}.weight"], np.float32).transpose(2, 3, 1, 0)
  out = {"kernel": np.ascontiguousarray(kernel)}
  if f"{prefix}.bias" in state_dict:
    out["bias"] = np.asarray(state_dict[f"{prefix}.bias"], np.float32)
  return out


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], part: str, source: str = ""
) -> tuple[Layout, dict[str, Any]]:
  """Converts a PyTorch TAESD-family encoder or decoder state dict to Flax params.

  Args:
    state_dict: tensor name -> array (any float dtype; fp16 files are cast to float32).
    part: "encoder" or "decoder".
    source: what to call the state dict in errors.

  Returns:
    (layout, params): the params of `TinyEncoder(layout)` / `TinyDecoder(layout)`, float32 numpy.

  Raises:
    ValueError: the state dict does not fit the layout (see `read_layout`).
  """
  layout = read_layout(state_dict, part, source)
  params: dict[str, Any] = {}
  for i, kind in _layers(part):
    if kind == "block":
      block = {f"conv_{k}": _conv_params(state_dict, f"{i}.conv.{k}") for k in (0, 2, 4)}
      if i in layout.pool_blocks:
        block["pool_0"] = _conv_params(state_dict, f"{i}.pool.0")
        block["pool_1"] = {
          "scale": np.asarray(state_dict[f"{i}.pool.1.weight"], np.float32),
          "bias": np.asarray(state_dict[f"{i}.pool.1.bias"], np.float32),
        }
        block["pool_3"] = _conv_params(state_dict, f"{i}.pool.3")
      params[f"block_{i}"] = block
    elif kind in ("conv_in", "conv_out", "down", "upconv"):
      params[f"conv_{i}"] = _conv_params(state_dict, str(i))
  return layout, params


class TinyAutoencoder(Autoencoder):
  """A TAESD-family tiny autoencoder: deterministic encoder (std 0), images in [-1, 1].

  Attributes (besides `Autoencoder`'s):
    encoder: the `TinyEncoder` module.
    decoder: the `TinyDecoder` module.
  """

  def __init__(
    self,
    encoder_layout: Layout,
    decoder_layout: Layout,
    params: Mapping[str, Any],
    identity: str,
    dtype: Any = jnp.float32,
  ):
    if encoder_layout.latent_channels != decoder_layout.latent_channels:
      raise ValueError(
        f"{identity}: the encoder gives {encoder_layout.latent_channels} latent channels, the "
        f"decoder takes {decoder_layout.latent_channels}"
      )
    self.encoder = TinyEncoder(encoder_layout, dtype)
    self.decoder = TinyDecoder(decoder_layout, dtype)
    self.weights_hash = params_hash(params)
    self.params = jax.device_put(dict(params))  # once, not on every jitted call
    self.identity = identity
    self.scale_factor = 1.0
    self.downsample_factor = 8
    self.latent_channels = encoder_layout.latent_channels

  @classmethod
  def from_state_dicts(
    cls,
    encoder_state_dict: Mapping[str, np.ndarray],
    decoder_state_dict: Mapping[str, np.ndarray],
    identity: str,
    *,
    encoder_source: str = "",
    decoder_source: str = "",
    dtype: Any = jnp.float32,
  ) -> TinyAutoencoder:
    """Converts the two PyTorch state dicts (see `convert_state_dict`) into an autoencoder."""
    enc_layout, enc_params = convert_state_dict(encoder_state_dict, "encoder", encoder_source)
    dec_layout, dec_params = convert_state_dict(decoder_state_dict, "decoder", decoder_source)
    if enc_layout.latent_channels != dec_layout.latent_channels:
      raise ValueError(
        f"{identity}: the encoder ({encoder_source or 'encoder state dict'}, tensor '14.weight') "
        f"gives {enc_layout.latent_channels} latent channels but the decoder "
        f"({decoder_source or 'decoder state dict'}, tensor '1.weight') takes "
        f"{dec_layout.latent_channels}"
      )
    params = {"encoder": enc_params, "decoder": dec_params}
    return cls(enc_layout, dec_layout, params, identity, dtype)

  def encode_fn(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    mean = self.encoder.apply({"params": params["encoder"]}, x)
    return mean, jnp.zeros_like(mean)

  def decode_fn(self, params: Any, latents: jax.Array) -> jax.Array:
    y = self.decoder.apply({"params": params["decoder"]}, latents.astype(jnp.float32))
    return jnp.clip(y * 2.0 - 1.0, -1.0, 1.0)


def _find_one(folder: str, suffix: str) -> str:
  found = sorted(glob.glob(os.path.join(glob.escape(folder), "*" + suffix)))
  if not found:
    raise FileNotFoundError(f"no *{suffix} file in the tiny autoencoder folder {folder}")
  if len(found) > 1:
    names = ", ".join(os.path.basename(f) for f in found)
    raise ValueError(f"more than one *{suffix} file in {folder} ({names}); keep one")
  return found[0]


def read_sums(path: str) -> dict[str, str]:
  """File name -> sha256 hex digest, from a `sha256sum` listing ("HASH  NAME" or "HASH *NAME").

  Raises:
    ValueError: a line is neither blank, a '#' comment nor such an entry; names the file and line.
  """
  sums = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
      if not m:
        raise ValueError(f"{path}:{number}: not a sha256sum line: {line!r}")
      sums[m.group(2)] = m.group(1).lower()
  return sums


def verify_sums(folder: str, files: Sequence[str]) -> None:
  """Checks `files` against the folder's SHA256SUMS, where the folder has one.

  Raises:
    ValueError: SHA256SUMS lists no hash for one of the files, or its hash differs; names it.
  """
  sums_path = os.path.join(folder, SUMS_NAME)
  if not os.path.isfile(sums_path):
    return
  sums = read_sums(sums_path)
  for path in files:
    name = os.path.basename(path)
    if name not in sums:
      raise ValueError(f"{sums_path} lists no sha256 for {name}; add it or remove {SUMS_NAME}")
    got = npz_io.file_digest(path)
    if got != sums[name]:
      raise ValueError(
        f"{path}: sha256 {got} does not match {sums[name]} in {sums_path}; the file is corrupt "
        "or not the one the listing describes"
      )


def load_tiny_autoencoder(
  path: str | os.PathLike = TAEF2_FOLDER, dtype: Any = jnp.float32
) -> TinyAutoencoder:
  """Loads a TAESD-family autoencoder from a folder holding `*encoder.pth` and `*decoder.pth`.

  Args:
    path: the folder (TAEF2_FOLDER: the shipped TAEF2). Where it holds SHA256SUMS, both files are
      checked against it first.
    dtype: compute dtype (parameters stay float32).

  Returns:
    The autoencoder; identity "KIND:ABS_FOLDER", KIND the files' common prefix without its
    trailing "_" ("taef2" for taef2_encoder.pth), or "taesd" for plain encoder.pth.

  Raises:
    FileNotFoundError: no such folder, or no *encoder.pth / *decoder.pth in it.
    ValueError: more than one of either file, their prefixes differ, a hash does not match, or a
      state dict does not fit the TAESD layout (naming the file and the tensor);
      `torch_files.TorchFileError` (a ValueError) for a file that is not a PyTorch file.
  """
  folder = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tiny autoencoder folder {folder} does not exist")
  encoder_file = _find_one(folder, ENCODER_SUFFIX)
  decoder_file = _find_one(folder, DECODER_SUFFIX)
  kinds = [
    os.path.basename(f)[: -len(suffix)].rstrip("_-.")
    for f, suffix in ((encoder_file, ENCODER_SUFFIX), (decoder_file, DECODER_SUFFIX))
  ]
  if kinds[0] != kinds[1]:
    raise ValueError(
      f"{folder}: {os.path.basename(encoder_file)} and {os.path.basename(decoder_file)} are not "
      "of one autoencoder (their prefixes differ)"
    )
  verify_sums(folder, [encoder_file, decoder_file])
  return TinyAutoencoder.from_state_dicts(
    torch_files.load_state_dict(encoder_file),
    torch_files.load_state_dict(decoder_file),
    f"{kinds[0] or DEFAULT_KIND}:{folder}",
    encoder_source=encoder_file,
    decoder_source=decoder_file,
    dtype=dtype,
  )

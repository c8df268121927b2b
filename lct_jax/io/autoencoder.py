"""Autoencoders: the SD VAE (diffusers FlaxAutoencoderKL), the weightless `pixel` and `gray`.

This module owns loading VAE weights (a Hugging Face id such as the paper's
`stabilityai/sd-vae-ft-ema`, or a local folder; Flax msgpack or PyTorch safetensors converted
without torch), the weights hash that identifies them, and the two directions images <-> raw
latents. Everything is NHWC: images (B, H, W, 3) in [-1, 1], latents (B, H/f, W/f, C).

Latents here are always in *raw* VAE scale (no 0.18215 factor). The dataset normalization of
docs/method.md section 3.0 lives in one place only, `lct_jax.io.latents`.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
CONFIG_NAME = "config.json"
FLAX_WEIGHTS_NAME = "diffusion_flax_model.msgpack"
SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# The architecture of stabilityai/sd-vae-ft-ema (its config.json), for benchmarks and tests that
# need the paper's VAE shape with random weights.
SD_VAE_CONFIG: dict[str, Any] = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ["DownEncoderBlock2D"] * 4,
  "up_block_types": ["UpDecoderBlock2D"] * 4,
  "block_out_channels": [128, 256, 512, 512],
  "layers_per_block": 2,
  "act_fn": "silu",
  "latent_channels": 4,
  "norm_num_groups": 32,
  "sample_size": 256,
  "scaling_factor": 0.18215,
}

_HOW_TO_PROVIDE = (
  "To use a local copy, put the VAE's config.json and its weights ({flax} or {st}) in a folder "
  "(on a machine with network access: `hf download {repo} --local-dir DIR`, then copy "
  "DIR here) and pass that folder as the autoencoder (e.g. --config.autoencoder=DIR for the "
  "encode job, data.autoencoder for training)."
)


class AutoencoderLoadError(OSError):
  """The autoencoder's weights could not be found, downloaded or read."""


def _silence_diffusers() -> None:
  # diffusers imports torch._dynamo, which imports triton where it is installed (CUDA torch), and
  # triton segfaults in a process that holds TensorFlow: hidden, TensorFlow and the VAE load in
  # any order. lct_jax imports torch only here, through diffusers.
  sys.modules.setdefault("triton", None)
  import diffusers

  diffusers.utils.logging.set_verbosity_error()


def _flax_vae_class() -> Any:
  _silence_diffusers()
  from diffusers import FlaxAutoencoderKL

  return FlaxAutoencoderKL


def params_hash(params: Any) -> str:
  """sha256 over a parameter tree: sorted '/'-joined names, dtype, shape and C-order bytes.

  Args:
    params: nested dict of arrays.

  Returns:
    The hex digest; equal trees (same names, shapes, dtypes and values) give equal digests.
  """
  flat = traverse_util.flatten_dict(serialization.to_state_dict(params), sep="/")
  h = hashlib.sha256()
  for name in sorted(flat):
    value = np.ascontiguousarray(np.asarray(flat[name]))
    h.update(f"{name}|{value.dtype.str}|{value.shape}\n".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def images_to_uint8(images: jax.Array) -> jax.Array:
  """Maps images in [-1, 1] to uint8 [0, 255] (clamped, rounded to nearest)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class Autoencoder(abc.ABC):
  """Common interface of the VAE and the pixel autoencoder.

  Attributes:
    identity: the id or path the weights came from ("pixel" / "pixel:4" for the pixel one).
    weights_hash: sha256 of the parameters (see `params_hash`).
    scale_factor: the VAE's latent scale factor (0.18215 for SD); recorded, never applied here.
    downsample_factor: spatial factor f between images and latents.
    latent_channels: C of the latents.
    params: the parameter tree (empty for the pixel autoencoder).
  """

  identity: str
  weights_hash: str
  scale_factor: float
  downsample_factor: int
  latent_channels: int
  params: Any

  @abc.abstractmethod
  def encode_fn(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pure function: images (B, H, W, 3) in [-1, 1] -> posterior (mean, std) in raw scale."""

  @abc.abstractmethod
  def decode_fn(self, params: Any, latents: jax.Array) -> jax.Array:
    """Pure function: raw latents (B, h, w, C) -> images (B, H, W, 3), float, clamped to [-1, 1]."""

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    """(H, W, C) of the latent of a square image of side `resolution`."""
    f = self.downsample_factor
    if resolution % f:
      raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's factor {f}")
    return (resolution // f, resolution // f, self.latent_channels)

  @functools.cached_property
  def _jit_encode(self) -> Callable[..., Any]:
    return jax.jit(self.encode_fn)

  @functools.cached_property
  def _jit_decode(self) -> Callable[..., Any]:
    return jax.jit(lambda p, z: images_to_uint8(self.decode_fn(p, z)))

  @functools.cached_property
  def _jit_decode_float(self) -> Callable[..., Any]:
    return jax.jit(self.decode_fn)

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes images (B, H, W, 3) in [-1, 1] to the posterior (mean, std), raw VAE scale.

    Args:
      images: float array, NHWC, values in [-1, 1].

    Returns:
      (mean, std), each (B, H/f, W/f, C) float32.
    """
    return self._jit_encode(self.params, jnp.asarray(images, jnp.float32))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Decodes raw-scale latents (B, h, w, C) to uint8 images (B, H, W, 3)."""
    return self._jit_decode(self.params, jnp.asarray(latents, jnp.float32))

  def decode_float(self, latents: jax.Array) -> jax.Array:
    """Decodes raw-scale latents to float images in [-1, 1] (clamped), NHWC."""
    return self._jit_decode_float(self.params, jnp.asarray(latents, jnp.float32))


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/f, W/f, f*f*C); channel index = (dy * f + dx) * C + c."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // factor, w // factor, factor * factor * c)


def depth_to_space(z: jax.Array, factor: int) -> jax.Array:
  """Exact inverse of `space_to_depth`."""
  b, h, w, cc = z.shape
  c = cc // (factor * factor)
  z = z.reshape(b, h, w, factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
  return z.reshape(b, h * factor, w * factor, c)


class PixelAutoencoder(Autoencoder):
  """Weightless autoencoder: exact space-to-depth by `factor`; the posterior std is 0.

  Latents are pixel values in [-1, 1] rearranged; decode is the exact inverse, so pixel-space
  training and the pixel side of the paper's Fig. 1 use the same code path as the VAE. With
  `gray` ("gray", "gray:F"), an RGB image becomes one gray channel first (R where R = G = B, so a
  gray image round-trips exactly; else the ITU-R 601 luma that PIL's "L" mode uses) and decoding
  repeats the gray channel three times: grayscale data (the MNIST demo) trains on a third of the
  channels, and every sample is gray.
  """

  def __init__(self, factor: int = 1, gray: bool = False):
    if factor < 1:
      raise ValueError(f"pixel autoencoder factor must be >= 1, got {factor}")
    self.downsample_factor = factor
    self.gray = gray
    self.latent_channels = (1 if gray else 3) * factor * factor
    kind = "gray" if gray else "pixel"
    self.identity = kind if factor == 1 else f"{kind}:{factor}"
    self.scale_factor = 1.0
    self.params = {}
    self.weights_hash = hashlib.sha256(self.identity.encode()).hexdigest()

  def encode_fn(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    del params
    x = images.astype(jnp.float32)
    if self.gray:
      r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
      luma = 0.299 * r + 0.587 * g + 0.114 * b
      x = jnp.where((r == g) & (g == b), r, luma)
    z = space_to_depth(x, self.downsample_factor)
    return z, jnp.zeros_like(z)

  def decode_fn(self, params: Any, latents: jax.Array) -> jax.Array:
    del params
    x = jnp.clip(depth_to_space(latents, self.downsample_factor), -1.0, 1.0)
    return jnp.repeat(x, 3, axis=-1) if self.gray else x


class VAEAutoencoder(Autoencoder):
  """diffusers `FlaxAutoencoderKL` with loaded weights, called on NHWC arrays."""

  def __init__(self, model: Any, params: Any, identity: str):
    self.model = model
    self.weights_hash = params_hash(params)
    self.params = jax.device_put(params)  # once, not on every jitted call
    self.identity = identity
    self.scale_factor = float(model.config.scaling_factor)
    self.downsample_factor = 2 ** (len(model.config.block_out_channels) - 1)
    self.latent_channels = int(model.config.latent_channels)

  def encode_fn(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    from diffusers.models.vae_flax import FlaxDiagonalGaussianDistribution

    # Call the submodules directly: FlaxAutoencoderKL.encode/decode transpose NCHW<->NHWC.
    def run(module: Any, x: jax.Array) -> jax.Array:
      return module.quant_conv(module.encoder(x, deterministic=True))

    moments = self.model.apply({"params": params}, images.astype(jnp.float32), method=run)
    posterior = FlaxDiagonalGaussianDistribution(moments)
    return posterior.mean, posterior.std

  def decode_fn(self, params: Any, latents: jax.Array) -> jax.Array:
    def run(module: Any, z: jax.Array) -> jax.Array:
      return module.decoder(module.post_quant_conv(z), deterministic=True)

    images = self.model.apply({"params": params}, latents.astype(jnp.float32), method=run)
    return jnp.clip(images, -1.0, 1.0)


def build_vae_model(config: Mapping[str, Any], dtype: Any = jnp.float32) -> Any:
  """Builds an (unparameterized) FlaxAutoencoderKL from a diffusers config dict."""
  cls = _flax_vae_class()
  config = {k: v for k, v in config.items() if not k.startswith("_")}
  return cls.from_config(config, dtype=dtype)


def _param_shapes(model: Any) -> dict[tuple[str, ...], Any]:
  shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
  return traverse_util.flatten_dict(serialization.to_state_dict(shapes))


def init_random_vae_params(model: Any, seed: int = 0) -> Any:
  """Random parameters for `model` (tests and benchmarks only; never a loading fallback).

  Numpy-drawn (flax's threefry init takes tens of seconds to compile on CPU): kernels
  N(0, 1/fan_in), biases 0, norm scales 1.

  Args:
    model: a FlaxAutoencoderKL.
    seed: numpy seed.

  Returns:
    A nested dict of float32 numpy arrays with the model's parameter structure.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, sds in sorted(_param_shapes(model).items()):
    if key[-1] == "kernel":
      fan_in = int(np.prod(sds.shape[:-1]))
      flat[key] = (rng.standard_normal(sds.shape) / np.sqrt(fan_in)).astype(np.float32)
    elif key[-1] == "scale":
      flat[key] = np.ones(sds.shape, np.float32)
    else:
      flat[key] = (0.01 * rng.standard_normal(sds.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def save_vae(folder: str, model: Any, params: Any) -> None:
  """Writes config.json + diffusion_flax_model.msgpack (diffusers' own layout) to `folder`."""
  _silence_diffusers()
  model.save_pretrained(folder, params=params)


def _check_params(model: Any, params: Any, source: str) -> Any:
  expected = _param_shapes(model)
  flat = traverse_util.flatten_dict(serialization.to_state_dict(params))
  missing = sorted(".".join(k) for k in set(expected) - set(flat))
  unexpected = sorted(".".join(k) for k in set(flat) - set(expected))
  wrong = sorted(
    f"{'.'.join(k)}: {tuple(np.shape(flat[k]))} != {tuple(expected[k].shape)}"
    for k in set(flat) & set(expected)
    if tuple(np.shape(flat[k])) != tuple(expected[k].shape)
  )
  if missing or unexpected or wrong:
    raise AutoencoderLoadError(
      f"VAE weights in {source} do not match the architecture in its config.json: "
      f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
      f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}), "
      f"wrong shapes {wrong[:5]} ({len(wrong)})."
    )
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)


class _NumpyTensor:
  """What diffusers' converter expects of a torch tensor: a `.numpy()` method."""

  def __init__(self, array: np.ndarray):
    self._array = array

  def numpy(self) -> np.ndarray:
    return self._array


class _ShapeOnlyModel:
  """Stands in for the model in diffusers' converter, which only reads parameter shapes."""

  def __init__(self, model: Any):
    self._model = model

  def init_weights(self, rng: jax.Array) -> Any:
    return jax.eval_shape(self._model.init_weights, rng)


def convert_pytorch_state_dict(state_dict: Mapping[str, np.ndarray], model: Any) -> Any:
  """Converts a PyTorch-layout AutoencoderKL state dict (numpy arrays) to Flax params, no torch.

  Uses diffusers' own renaming and transposition rules (OIHW conv kernels -> HWIO, linear
  transposes, norm weight -> scale, to_q/to_k/to_v/to_out.0 -> query/key/value/proj_attn).

  Args:
    state_dict: name -> numpy array, as in `diffusion_pytorch_model.safetensors`.
    model: the FlaxAutoencoderKL the params are for.

  Returns:
    The Flax parameter tree (float32 numpy arrays).
  """
  from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

  wrapped = {k: _NumpyTensor(np.asarray(v, np.float32)) for k, v in state_dict.items()}
  params = convert_pytorch_state_dict_to_flax(wrapped, _ShapeOnlyModel(model))
  return jax.tree_util.tree_map(np.asarray, params)


def _load_weights(model: Any, weights_file: str) -> Any:
  if weights_file.endswith(".msgpack"):
    with open(weights_file, "rb") as f:
      return serialization.msgpack_restore(f.read())
  from safetensors.numpy import load_file

  return convert_pytorch_state_dict(load_file(weights_file), model)


def _resolve_hub_files(repo: str, local_files_only: bool) -> tuple[str, str]:
  """Downloads (or finds in the HF cache) config.json and one weights file of a hub repo."""
  from huggingface_hub import hf_hub_download
  from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

  parts = repo.split("/")
  repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
  kw = dict(repo_id=repo_id, subfolder=subfolder, local_files_only=local_files_only)
  config_file = hf_hub_download(filename=CONFIG_NAME, **kw)
  try:
    return config_file, hf_hub_download(filename=FLAX_WEIGHTS_NAME, **kw)
  except LocalEntryNotFoundError:
    raise
  except EntryNotFoundError:
    return config_file, hf_hub_download(filename=SAFETENSORS_WEIGHTS_NAME, **kw)


def _local_files(folder: str) -> tuple[str, str]:
  config_file = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
  for name in (FLAX_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME):
    if os.path.isfile(os.path.join(folder, name)):
      return config_file, os.path.join(folder, name)
  raise FileNotFoundError(f"neither {FLAX_WEIGHTS_NAME} nor {SAFETENSORS_WEIGHTS_NAME} in {folder}")


PIXEL_KINDS = ("pixel", "gray")


def parse_pixel_name(name: str) -> tuple[int, bool] | None:
  """(factor, gray) of a pixel autoencoder name ("pixel" -> (1, False), "gray:2" -> (2, True));
  None for any other name."""
  kind, sep, factor = name.partition(":")
  if kind not in PIXEL_KINDS:
    return None
  if not sep:
    return 1, kind == "gray"
  try:
    return int(factor), kind == "gray"
  except ValueError:
    raise ValueError(
      f"bad pixel autoencoder name {name!r}; use 'pixel', 'pixel:F', 'gray' or 'gray:F'"
    ) from None


# Tiny autoencoders (lct_jax.io.taesd): "taef2" is the TAEF2 shipped with lct_jax, "KIND:FOLDER"
# (KIND one of these) a folder holding KIND_encoder.pth and KIND_decoder.pth.
TINY_KINDS = ("taef2", "taef1", "taesd3", "taesdxl", "taesd")
SHIPPED_TINY = "taef2"


def _tiny_folder(name: str) -> str | None:
  """The folder of a tiny-autoencoder name, or None for any other name."""
  if name == SHIPPED_TINY:
    from lct_jax.io import taesd

    return taesd.TAEF2_FOLDER
  kind, sep, folder = name.partition(":")
  if sep and kind in TINY_KINDS and folder:
    return os.path.abspath(os.path.expanduser(folder))
  return None


def canonical_name(name: str) -> str:
  """The identity a name loads as: 'pixel:1' -> 'pixel', a local folder -> its absolute path."""
  parsed = parse_pixel_name(name)
  if parsed is not None:
    return PixelAutoencoder(*parsed).identity
  folder = _tiny_folder(name)
  if folder is not None:
    return name if name == SHIPPED_TINY else f"{name.partition(':')[0]}:{folder}"
  if os.path.isdir(os.path.expanduser(name)):
    return os.path.abspath(os.path.expanduser(name))
  return name


def _load_tiny(name: str, folder: str, dtype: Any) -> Autoencoder:
  from lct_jax.io import taesd

  try:
    ae = taesd.load_tiny_autoencoder(folder, dtype=dtype)
  except (OSError, ValueError) as e:
    raise AutoencoderLoadError(f"Could not load the tiny autoencoder {name!r}: {e}") from e
  ae.identity = canonical_name(name)
  return ae


def load_autoencoder(
  name: str = DEFAULT_VAE, *, local_files_only: bool = False, dtype: Any = jnp.float32
) -> Autoencoder:
  """Loads an autoencoder by name.

  Args:
    name: "pixel" or "pixel:F" (space-to-depth by F), "gray" or "gray:F" (the same on one gray
      channel), "taef2" (the TAEF2 tiny autoencoder shipped with lct_jax), "KIND:FOLDER" (a
      TAESD-family folder, KIND one of TINY_KINDS; lct_jax.io.taesd), a local folder holding
      config.json and
      diffusion_flax_model.msgpack or diffusion_pytorch_model.safetensors, or a Hugging Face id
      ("org/repo", or "org/repo/subfolder" for a VAE inside a pipeline repo).
    local_files_only: for hub ids, use only the local Hugging Face cache.
    dtype: compute dtype of the VAE (parameters stay float32).

  Returns:
    The autoencoder.

  Raises:
    AutoencoderLoadError: the weights could not be found or read; the message names what was
      tried and how to provide a local folder. There is no fallback to random weights.
  """
  parsed = parse_pixel_name(name)
  if parsed is not None:
    return PixelAutoencoder(*parsed)
  tiny = _tiny_folder(name)
  if tiny is not None:
    return _load_tiny(name, tiny, dtype)
  folder = os.path.expanduser(name)
  is_local = os.path.isdir(folder) or name.startswith((".", "/", "~")) or name.count("/") == 0
  repo = name if not is_local else DEFAULT_VAE
  try:
    if is_local:
      config_file, weights_file = _local_files(folder)
      identity = os.path.abspath(folder)
    else:
      config_file, weights_file = _resolve_hub_files(name, local_files_only)
      identity = name
  except Exception as e:  # noqa: BLE001 - every failure becomes the one documented error
    where = (
      f"local folder {os.path.abspath(folder)!r}"
      if is_local
      else f"Hugging Face id {name!r} (no local folder of that name exists either)"
    )
    raise AutoencoderLoadError(
      f"Could not load autoencoder weights from {where}: {type(e).__name__}: {e}\n"
      + _HOW_TO_PROVIDE.format(flax=FLAX_WEIGHTS_NAME, st=SAFETENSORS_WEIGHTS_NAME, repo=repo)
    ) from e
  with open(config_file) as f:
    model = build_vae_model(json.load(f), dtype=dtype)
  try:
    params = _load_weights(model, weights_file)
  except Exception as e:  # noqa: BLE001
    raise AutoencoderLoadError(f"Could not read VAE weights {weights_file}: {e}") from e
  params = _check_params(model, params, weights_file)
  return VAEAutoencoder(model, params, identity)

"""Tests of lct_jax.io.autoencoder: VAE loading (msgpack, safetensors without torch), errors,
and the pixel autoencoder."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tiny_vae import TINY_VAE, save_tiny_vae

from lct_jax.io import autoencoder as ae_lib


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  """A random tiny FlaxAutoencoderKL saved by diffusers' own save_pretrained (msgpack)."""
  folder = str(tmp_path_factory.mktemp("vae_msgpack"))
  model, params = save_tiny_vae(folder, seed=3)
  return model, params, folder


def _torch_layout(params, legacy_attention: bool) -> dict:
  """What a torch AutoencoderKL state_dict looks like for these params (written independently
  of diffusers' converter): dotted names, OIHW convs, (out, in) linears, norm `weight`."""
  modern = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
  out = {}
  for key, value in traverse_util.flatten_dict(params).items():
    names = []
    for part in key[:-1]:
      m = re.fullmatch(r"(.+)_(\d+)", part)
      names.append(f"{m.group(1)}.{m.group(2)}" if m else part)
    if names[-1] in modern and not legacy_attention:
      names[-1] = modern[names[-1]]
    leaf, value = key[-1], np.asarray(value)
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    out[".".join(names + [leaf])] = np.ascontiguousarray(value)
  return out


def _reference_encode(model, params, images_nhwc):
  """diffusers' own FlaxAutoencoderKL.encode (NCHW input), independent of our wrapper."""
  x = jnp.transpose(jnp.asarray(images_nhwc), (0, 3, 1, 2))
  dist = model.apply({"params": params}, x, method=model.encode).latent_dist
  return np.asarray(dist.mean), np.asarray(dist.std)


def _assert_same_tree(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_msgpack_roundtrip_identical_outputs(tiny_vae):
  model, params, folder = tiny_vae
  ae = ae_lib.load_autoencoder(folder)
  _assert_same_tree(ae.params, params)
  assert ae.identity == os.path.abspath(folder)
  assert ae.weights_hash == ae_lib.params_hash(params)
  assert ae.downsample_factor == 2 and ae.latent_shape(16) == (8, 8, 4)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, std = ae.encode_moments(images)
  ref_mean, ref_std = _reference_encode(model, params, images)
  np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(std), ref_std, rtol=1e-5, atol=1e-6)
  out = model.apply({"params": params}, jnp.asarray(mean), method=model.decode).sample
  ref = np.clip(
    np.round((np.clip(np.transpose(np.asarray(out), (0, 2, 3, 1)), -1, 1) + 1) * 127.5), 0, 255
  )
  decoded = np.asarray(ae.decode(mean))
  assert decoded.dtype == np.uint8 and decoded.shape == (2, 16, 16, 3)
  assert np.abs(decoded.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("legacy_attention", [False, True])
def test_safetensors_conversion_matches_flax_params(tiny_vae, tmp_path, legacy_attention):
  from safetensors.numpy import save_file

  model, params, folder = tiny_vae
  st_dir = tmp_path / "vae_st"
  st_dir.mkdir()
  shutil.copy(os.path.join(folder, ae_lib.CONFIG_NAME), st_dir / ae_lib.CONFIG_NAME)
  save_file(_torch_layout(params, legacy_attention), str(st_dir / ae_lib.SAFETENSORS_WEIGHTS_NAME))
  ae = ae_lib.load_autoencoder(str(st_dir))
  _assert_same_tree(ae.params, params)
  assert ae.weights_hash == ae_lib.params_hash(params)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ref = ae_lib.load_autoencoder(folder)
  for a, b in zip(ae.encode_moments(images), ref.encode_moments(images)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_incomplete_safetensors_is_an_error(tiny_vae, tmp_path):
  from safetensors.numpy import save_file

  model, params, folder = tiny_vae
  shutil.copy(os.path.join(folder, ae_lib.CONFIG_NAME), tmp_path / ae_lib.CONFIG_NAME)
  state = _torch_layout(params, False)
  state.pop("decoder.conv_out.weight")
  save_file(state, str(tmp_path / ae_lib.SAFETENSORS_WEIGHTS_NAME))
  with pytest.raises(ae_lib.AutoencoderLoadError, match="decoder.conv_out.kernel"):
    ae_lib.load_autoencoder(str(tmp_path))


def test_missing_weights_error_names_what_was_tried(tmp_path):
  with open(tmp_path / ae_lib.CONFIG_NAME, "w") as f:
    json.dump(TINY_VAE, f)
  with pytest.raises(ae_lib.AutoencoderLoadError) as err:
    ae_lib.load_autoencoder(str(tmp_path))
  assert str(tmp_path) in str(err.value) and "local copy" in str(err.value)
  with pytest.raises(ae_lib.AutoencoderLoadError) as err:
    ae_lib.load_autoencoder("no-such-org/no-such-vae", local_files_only=True)
  assert "'no-such-org/no-such-vae'" in str(err.value) and "--local-dir" in str(err.value)


def _space_to_depth_loops(x: np.ndarray, f: int) -> np.ndarray:
  b, h, w, c = x.shape
  z = np.zeros((b, h // f, w // f, f * f * c), x.dtype)
  for i in range(h // f):
    for j in range(w // f):
      for dy in range(f):
        for dx in range(f):
          z[:, i, j, (dy * f + dx) * c : (dy * f + dx + 1) * c] = x[:, i * f + dy, j * f + dx, :]
  return z


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_pixel_autoencoder_is_exact_inverse(factor):
  ae = ae_lib.load_autoencoder("pixel" if factor == 1 else f"pixel:{factor}")
  assert ae.latent_shape(16) == (16 // factor, 16 // factor, 3 * factor * factor)
  u8 = np.random.default_rng(factor).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  images = u8.astype(np.float32) / 127.5 - 1.0
  mean, std = ae.encode_moments(images)
  np.testing.assert_array_equal(np.asarray(mean), _space_to_depth_loops(images, factor))
  np.testing.assert_array_equal(np.asarray(std), 0.0)
  np.testing.assert_array_equal(np.asarray(ae.decode_float(mean)), images)
  np.testing.assert_array_equal(np.asarray(ae.decode(mean)), u8)
  with pytest.raises(ValueError, match="multiple"):
    ae_lib.load_autoencoder("pixel:3").latent_shape(16)


@pytest.mark.parametrize("factor", [1, 2])
def test_gray_autoencoder_keeps_gray_images_exactly_and_takes_the_luma_of_colour(factor):
  ae = ae_lib.load_autoencoder("gray" if factor == 1 else f"gray:{factor}")
  assert ae.latent_shape(16) == (16 // factor, 16 // factor, factor * factor)
  rng = np.random.default_rng(factor)
  gray = np.repeat(rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8), 3, axis=-1)
  images = gray.astype(np.float32) / 127.5 - 1.0
  mean, std = ae.encode_moments(images)
  np.testing.assert_array_equal(np.asarray(mean), _space_to_depth_loops(images[..., :1], factor))
  np.testing.assert_array_equal(np.asarray(std), 0.0)
  np.testing.assert_array_equal(np.asarray(ae.decode(mean)), gray)  # every channel the same
  colour = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.float64) / 127.5 - 1.0
  luma = colour @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L" mode
  got = np.asarray(ae.decode_float(ae.encode_moments(colour.astype(np.float32))[0]))
  np.testing.assert_allclose(got, np.repeat(luma[..., None], 3, axis=-1), atol=3e-7)


def test_names_and_hash():
  assert ae_lib.canonical_name("pixel:1") == "pixel"
  assert ae_lib.canonical_name("gray:1") == "gray" and ae_lib.canonical_name("gray:2") == "gray:2"
  with pytest.raises(ValueError, match="'gray:F'"):
    ae_lib.load_autoencoder("gray:x")
  assert ae_lib.canonical_name("stabilityai/sd-vae-ft-ema") == "stabilityai/sd-vae-ft-ema"
  a = {"x": {"kernel": np.ones((2, 3), np.float32)}}
  b = {"x": {"kernel": np.ones((3, 2), np.float32)}}
  assert ae_lib.params_hash(a) == ae_lib.params_hash({"x": {"kernel": np.ones((2, 3), np.float32)}})
  assert ae_lib.params_hash(a) != ae_lib.params_hash(b)

"""Tests of lct_jax.io.taesd: the Flax TAESD-family tiny autoencoder and its loader.

The reference is a PyTorch network written in this file from the architecture's description
(torch.nn layers, loaded with torch.load and a strict load_state_dict, so the key layout is
checked too), compared with the Flax network in float32 on the shipped TAEF2 weights and on
random state dicts of other layouts (plain TAESD: 4 latent channels, no pool branch). Also: state
dicts that do not fit are refused naming the tensor, real photos round-trip at the PSNR TAEF2 is
known for, and the shipped files load and are checked against SHA256SUMS. The torch tests skip
without torch, the photo test without scikit-image (both in requirements-torch.txt).
"""

import hashlib
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lct_jax.fid import torch_files
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import taesd

SHIPPED_SHA256 = {
  "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
  "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
# Float32 agreement between the Flax and the torch network: max |flax - torch| / max |torch|.
# Measured about 1e-6 (see test_taef2_matches_torch); 2e-5 leaves room for other CPUs' kernels and
# still fails on any real difference (a wrong padding or Block order gives errors of order 1).
REL_TOL = 2e-5
# Round-trip PSNR (dB) of 256x256 centre crops of scikit-image photos: measured with float32
# (29.67, 31.24, 32.75, 32.29, equal with torch); the floors are 0.3 dB under.
PSNR_FLOOR = {"astronaut": 29.37, "coffee": 30.94, "chelsea": 32.45, "rocket": 31.99}


def _torch():
  return pytest.importorskip(
    "torch", reason="torch is not importable: pip install -r requirements-torch.txt"
  )


def _torch_network(part, latent, width=64, pool_width=256, pool_blocks=()):
  """The TAESD-family encoder or decoder as torch.nn.Sequential, indexed as the state dicts are.

  Written from the description, not from lct_jax: Block = optional x + pool(x), then
  ReLU(conv-ReLU-conv-ReLU-conv + skip); pool = conv1x1 -> GroupNorm(4) -> ReLU -> conv1x1.
  """
  torch = _torch()
  nn = torch.nn

  class Block(nn.Module):
    def __init__(self, pool):
      super().__init__()
      self.conv = nn.Sequential(
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
      )
      self.pool = None
      if pool:
        self.pool = nn.Sequential(
          nn.Conv2d(width, pool_width, 1, bias=False),
          nn.GroupNorm(4, pool_width),
          nn.ReLU(),
          nn.Conv2d(pool_width, width, 1, bias=False),
        )

    def forward(self, x):
      if self.pool is not None:
        x = x + self.pool(x)
      return torch.relu(self.conv(x) + x)

  class Clamp(nn.Module):
    def forward(self, x):
      return torch.tanh(x / 3) * 3

  layers = []

  def add_blocks(n):
    for _ in range(n):
      layers.append(Block(len(layers) in pool_blocks))

  if part == "encoder":
    layers.append(nn.Conv2d(3, width, 3, padding=1))
    add_blocks(1)
    for _ in range(3):
      layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False))
      add_blocks(3)
    layers.append(nn.Conv2d(width, latent, 3, padding=1))
  else:
    layers += [Clamp(), nn.Conv2d(latent, width, 3, padding=1), nn.ReLU()]
    for _ in range(3):
      add_blocks(3)
      layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1, bias=False)]
    add_blocks(1)
    layers.append(nn.Conv2d(width, 3, 3, padding=1))
  return nn.Sequential(*layers).eval()


def _run_torch(net, x_nhwc):
  torch = _torch()
  with torch.no_grad():
    y = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return y.numpy().transpose(0, 2, 3, 1)


def _errors(got, want):
  """(max abs error, max abs error / max |want|)."""
  err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  return err, err / float(np.max(np.abs(want)))


def _check_close(what, got, want):
  assert got.shape == want.shape, what
  err, rel = _errors(got, want)
  print(f"{what}: max abs {err:.3g}, rel {rel:.3g} (max |torch| {np.max(np.abs(want)):.3g})")
  assert rel < REL_TOL, f"{what}: max abs error {err:.3g}, relative {rel:.3g}"


def _flax_apply(module, params):
  return jax.jit(lambda x: module.apply({"params": params}, x))


@pytest.fixture(scope="module")
def taef2():
  return taesd.load_tiny_autoencoder(taesd.TAEF2_FOLDER)


@pytest.fixture(scope="module")
def taef2_torch():
  torch = _torch()
  nets = {}
  for part, pools in (("encoder", (11, 12, 13)), ("decoder", (3, 4, 5))):
    net = _torch_network(part, 32, pool_blocks=pools)
    path = os.path.join(taesd.TAEF2_FOLDER, f"taef2_{part}.pth")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    nets[part] = net.float()
  return nets


@pytest.mark.parametrize("height, width", [(64, 64), (96, 128)])
def test_taef2_matches_torch(taef2, taef2_torch, height, width):
  """Encoder and decoder agree with the torch network to float32 round-off, at two sizes (one
  not square, so H and W cannot be swapped unnoticed)."""
  rng = np.random.default_rng(height)
  images = rng.uniform(0, 1, (2, height, width, 3)).astype(np.float32)
  want = _run_torch(taef2_torch["encoder"], images)
  got = _flax_apply(taef2.encoder, taef2.params["encoder"])(images)
  _check_close(f"TAEF2 encoder {height}x{width}", np.asarray(got), want)

  # Decoder input: the encoder's latents and wider noise that reaches the tanh clamp (|z| > 3).
  noise = 2.0 * rng.standard_normal(want.shape).astype(np.float32)
  latents = np.concatenate([want, noise])
  want = _run_torch(taef2_torch["decoder"], latents)
  got = _flax_apply(taef2.decoder, taef2.params["decoder"])(latents)
  _check_close(f"TAEF2 decoder {height // 8}x{width // 8}", np.asarray(got), want)


def test_interface_maps_ranges(taef2, taef2_torch):
  """encode_moments takes [-1, 1] images (std 0), decode_float gives the [0, 1] output as
  [-1, 1], clamped; decode gives uint8."""
  assert isinstance(taef2, ae_lib.Autoencoder)
  rng = np.random.default_rng(1)
  images01 = rng.uniform(0, 1, (2, 32, 40, 3)).astype(np.float32)
  mean, std = taef2.encode_moments(images01 * 2 - 1)
  want = _run_torch(taef2_torch["encoder"], images01)
  _check_close("encode_moments 32x40", np.asarray(mean), want)
  assert std.shape == mean.shape and not np.any(np.asarray(std))

  latents = 2.0 * rng.standard_normal((2, 4, 5, 32)).astype(np.float32)
  want = np.clip(_run_torch(taef2_torch["decoder"], latents) * 2 - 1, -1, 1)
  got = np.asarray(taef2.decode_float(latents))
  assert got.min() >= -1 and got.max() <= 1
  assert np.max(np.abs(got - want)) < 1e-4
  assert taef2.decode(latents).dtype == jnp.uint8


def _random_state_dict(part, latent, width, pool_width, pool_blocks, seed):
  """A random torch network of that layout (GroupNorm affine randomized too) and its state dict
  as numpy arrays."""
  torch = _torch()
  torch.manual_seed(seed)
  net = _torch_network(part, latent, width, pool_width, pool_blocks)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if ".pool.1." in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
  state_dict = {k: v.numpy().copy() for k, v in net.state_dict().items()}
  return net, state_dict


LAYOUTS = {
  # name: latent, width, pool width, encoder pool Blocks, decoder pool Blocks
  "plain_taesd": (4, 64, 256, (), ()),
  "pool_elsewhere": (16, 32, 64, (1, 7), (8, 18)),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_other_layouts_match_torch(name):
  """Layouts other than TAEF2's, read from the state dict: plain TAESD (4 latent channels, no
  pool branch) and one with other widths and the pool branch on other Blocks."""
  latent, width, pool_width, enc_pools, dec_pools = LAYOUTS[name]
  enc_net, enc_sd = _random_state_dict("encoder", latent, width, pool_width, enc_pools, 1)
  dec_net, dec_sd = _random_state_dict("decoder", latent, width, pool_width, dec_pools, 2)
  ae = taesd.TinyAutoencoder.from_state_dicts(enc_sd, dec_sd, f"test:{name}")
  assert ae.encoder.layout == taesd.Layout(width, latent, enc_pools, pool_width)
  assert ae.decoder.layout == taesd.Layout(width, latent, dec_pools, pool_width)
  assert ae.latent_channels == latent

  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (2, 32, 48, 3)).astype(np.float32)
  want = _run_torch(enc_net, images)
  got = _flax_apply(ae.encoder, ae.params["encoder"])(images)
  _check_close(f"{name} encoder 32x48", np.asarray(got), want)
  latents = 2.0 * rng.standard_normal(want.shape).astype(np.float32)
  want = _run_torch(dec_net, latents)
  got = _flax_apply(ae.decoder, ae.params["decoder"])(latents)
  _check_close(f"{name} decoder 4x6", np.asarray(got), want)


def test_plain_files_load_as_taesd(tmp_path):
  """A folder of encoder.pth / decoder.pth (torch.save, fp16 like the released files) loads with
  kind "taesd" and the same parameters as the state dicts converted directly."""
  torch = _torch()
  sds = {}
  for part, seed in (("encoder", 3), ("decoder", 4)):
    _, sd = _random_state_dict(part, 4, 64, 256, (), seed)
    sds[part] = {k: v.astype(np.float16) for k, v in sd.items()}
    torch.save({k: torch.from_numpy(v) for k, v in sds[part].items()}, tmp_path / f"{part}.pth")
  ae = taesd.load_tiny_autoencoder(tmp_path)
  assert ae.identity == f"taesd:{tmp_path}"
  direct = taesd.TinyAutoencoder.from_state_dicts(sds["encoder"], sds["decoder"], "x")
  assert ae.weights_hash == direct.weights_hash
  assert ae.latent_shape(64) == (8, 8, 4)


@pytest.fixture(scope="module")
def taef2_state_dicts():
  return {
    part: torch_files.load_state_dict(os.path.join(taesd.TAEF2_FOLDER, f"taef2_{part}.pth"))
    for part in ("encoder", "decoder")
  }


def _wrong_shape(key, shape):
  def edit(sd):
    sd[key] = np.zeros(shape, np.float16)

  return edit


def _missing(key):
  def edit(sd):
    del sd[key]

  return edit


REFUSALS = [
  # part, edit, text the error must contain
  ("encoder", _wrong_shape("12.conv.2.weight", (64, 64, 1, 1)), "tensor '12.conv.2.weight' has"),
  ("encoder", _missing("7.conv.0.bias"), "missing tensor '7.conv.0.bias'"),
  ("encoder", _missing("12.pool.3.weight"), "missing tensor '12.pool.3.weight'"),
  ("encoder", _missing("0.weight"), "missing tensor '0.weight'"),
  ("encoder", _wrong_shape("15.weight", (64, 64, 3, 3)), "unexpected tensor '15.weight'"),
  ("encoder", _wrong_shape("2.pool.0.weight", (256, 64, 1, 1)), "unexpected tensor '2.pool.0"),
  ("encoder", _wrong_shape("2.bias", (64,)), "unexpected tensor '2.bias'"),
  ("encoder", _wrong_shape("0.weight", (64, 4, 3, 3)), "tensor '0.weight' has shape (64, 4, 3, 3)"),
  ("decoder", _wrong_shape("19.weight", (4, 64, 3, 3)), "tensor '19.weight' has shape"),
  ("decoder", _wrong_shape("4.pool.1.bias", (255,)), "tensor '4.pool.1.bias' has shape (255,)"),
  ("decoder", _missing("18.conv.4.weight"), "missing tensor '18.conv.4.weight'"),
  ("decoder", _wrong_shape("6.weight", (64, 64, 3, 3)), "unexpected tensor '6.weight'"),
]


@pytest.mark.parametrize("part, edit, text", REFUSALS)
def test_misfit_state_dict_is_refused(taef2_state_dicts, part, edit, text):
  sd = dict(taef2_state_dicts[part])
  edit(sd)
  with pytest.raises(ValueError, match=re.escape(text)):
    taesd.convert_state_dict(sd, part, source="SOURCE")


def test_latent_mismatch_is_refused(taef2_state_dicts):
  _, enc_sd = _random_state_dict("encoder", 4, 64, 256, (), 5)
  with pytest.raises(ValueError, match=r"'14\.weight'.* 4 latent channels.*'1\.weight'.* 32"):
    taesd.TinyAutoencoder.from_state_dicts(enc_sd, taef2_state_dicts["decoder"], "mixed")


def test_misfit_file_is_refused_naming_it(tmp_path, taef2_state_dicts):
  torch = _torch()
  shutil.copy(os.path.join(taesd.TAEF2_FOLDER, "taef2_encoder.pth"), tmp_path)
  sd = {k: torch.from_numpy(v) for k, v in taef2_state_dicts["decoder"].items()}
  sd["3.pool.0.weight"] = torch.zeros(256, 32, 1, 1, dtype=torch.float16)
  torch.save(sd, tmp_path / "taef2_decoder.pth")
  bad = str(tmp_path / "taef2_decoder.pth")
  with pytest.raises(ValueError, match=re.escape(bad) + r".*'3\.pool\.0\.weight' has shape"):
    taesd.load_tiny_autoencoder(tmp_path)


def _photo(name):
  data = pytest.importorskip("skimage.data", reason="pip install scikit-image")
  transform = pytest.importorskip("skimage.transform")
  image = getattr(data, name)()
  h, w = image.shape[:2]
  s = min(h, w)
  image = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
  return transform.resize(image, (256, 256), anti_aliasing=True).astype(np.float32)


def test_photos_round_trip(taef2):
  """Real photos at 256x256 through encode_moments and decode_float (Flax only): the PSNR that
  TAEF2 reaches with torch."""
  names = sorted(PSNR_FLOOR)
  images01 = np.stack([_photo(n) for n in names])
  mean, _ = taef2.encode_moments(images01 * 2 - 1)
  assert mean.shape == (4, 32, 32, 32)
  out01 = (np.asarray(taef2.decode_float(mean), np.float64) + 1) / 2
  mse = np.mean((out01 - images01) ** 2, axis=(1, 2, 3))
  psnr = dict(zip(names, (10 * np.log10(1 / mse)).round(2)))
  print(f"round-trip PSNR (dB): {psnr}")
  for name in names:
    assert psnr[name] > PSNR_FLOOR[name], psnr


def test_shipped_weights_load(taef2):
  folder = taesd.TAEF2_FOLDER
  assert os.path.isdir(folder)
  assert taef2.identity == f"taef2:{os.path.abspath(folder)}"
  assert (taef2.latent_channels, taef2.downsample_factor, taef2.scale_factor) == (32, 8, 1.0)
  assert taef2.latent_shape(256) == (32, 32, 32)
  assert taef2.weights_hash == ae_lib.params_hash(jax.device_get(taef2.params))
  assert taesd.read_sums(os.path.join(folder, "SHA256SUMS")) == SHIPPED_SHA256
  for name, digest in SHIPPED_SHA256.items():
    with open(os.path.join(folder, name), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name
  with open(os.path.join(folder, "LICENSE.taesd")) as f:
    licence = f.read()
  assert "MIT License" in licence and "Copyright (c) 2023 Ollin Boer Bohan" in licence
  n_params = sum(np.size(v) for v in jax.tree_util.tree_leaves(taef2.params))
  assert n_params == 1338528 + 1338499


def test_corrupt_copy_is_refused(tmp_path):
  folder = tmp_path / "taef2"
  shutil.copytree(taesd.TAEF2_FOLDER, folder)
  path = folder / "taef2_decoder.pth"
  os.chmod(path, 0o644)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit of a weight: still a readable file
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"taef2_decoder\.pth: sha256 [0-9a-f]{64} does not match"):
    taesd.load_tiny_autoencoder(folder)

  shutil.copy(os.path.join(taesd.TAEF2_FOLDER, "taef2_decoder.pth"), path)
  sums = folder / "SHA256SUMS"
  os.chmod(sums, 0o644)
  sums.write_text(f"{SHIPPED_SHA256['taef2_decoder.pth']}  taef2_decoder.pth\n")
  with pytest.raises(ValueError, match="lists no sha256 for taef2_encoder.pth"):
    taesd.load_tiny_autoencoder(folder)
  sums.write_text("not a listing\n")
  with pytest.raises(ValueError, match=r"SHA256SUMS:1: not a sha256sum line"):
    taesd.load_tiny_autoencoder(folder)
  sums.unlink()
  assert taesd.load_tiny_autoencoder(folder).identity == f"taef2:{folder}"


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
    taesd.load_tiny_autoencoder(tmp_path / "nowhere")
  shutil.copy(os.path.join(taesd.TAEF2_FOLDER, "taef2_encoder.pth"), tmp_path)
  where = re.escape(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no \*decoder\.pth file .*" + where):
    taesd.load_tiny_autoencoder(tmp_path)
  shutil.copy(os.path.join(taesd.TAEF2_FOLDER, "taef2_decoder.pth"), tmp_path / "taesd_decoder.pth")
  with pytest.raises(ValueError, match="prefixes differ"):
    taesd.load_tiny_autoencoder(tmp_path)
  shutil.copy(os.path.join(taesd.TAEF2_FOLDER, "taef2_decoder.pth"), tmp_path)
  with pytest.raises(ValueError, match=r"more than one \*decoder\.pth"):
    taesd.load_tiny_autoencoder(tmp_path)


def test_load_autoencoder_names_select_the_tiny_autoencoder(tmp_path):
  ae = ae_lib.load_autoencoder("taef2")
  assert ae.identity == ae_lib.canonical_name("taef2") == "taef2"
  assert ae.latent_shape(256) == (32, 32, 32) and ae.scale_factor == 1.0
  folder = tmp_path / "copy"
  shutil.copytree(taesd.TAEF2_FOLDER, folder)
  copy = ae_lib.load_autoencoder(f"taef2:{folder}")
  assert copy.identity == ae_lib.canonical_name(f"taef2:{folder}") == f"taef2:{folder}"
  assert copy.weights_hash == ae.weights_hash
  with pytest.raises(ae_lib.AutoencoderLoadError, match="nowhere"):
    ae_lib.load_autoencoder(f"taef2:{tmp_path / 'nowhere'}")

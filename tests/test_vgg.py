"""Tests of the VGG16 precision/recall features: lct_jax.fid.vgg and lct_jax.tools.convert_vgg16.

The tests use neither real weights file. A stand-in takes their place: a VGG16 built in torch
with torchvision's module layout and initialisation (configuration D: `features.N`, `avgpool`,
`classifier.N`), random weights and random biases (so that a lost bias shows). It is saved two ways:

* as torchvision's state dict;
* laid out as NVIDIA's StyleGAN2-ADA TorchScript vgg16.pt (a scripted module whose `layers` hold
  conv1..conv13, fc1..fc3 and LPIPS heads).

The Flax network is compared with the torch one on the same normalised input, and the two resizes
with torch's interpolate and TensorFlow 1's resize_bilinear. Where torchvision imports (not beside
the CPU torch of requirements-torch.txt), the stand-in is also checked against torchvision's own
VGG16.

VGG16 has 138M parameters and costs ~15 GFLOP per 224x224 image, so the model is built and
converted once per module and only two images go through it.
"""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import scratch

from lct_jax.fid import inception, npz_io, vgg
from lct_jax.tools import convert_vgg16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch():
  return pytest.importorskip(
    "torch", reason="torch is not importable: pip install -r requirements-torch.txt"
  )


# torchvision's VGG16 (configuration D): 3x3 convs with these widths, "M" a 2x2 max pool.
_VGG16_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_torchvision_layout(torch):
  """VGG16 in torch with torchvision's module names and indices and its weight initialisation
  (Kaiming normal fan-out convs, N(0, 0.01) linears); the classifier's dropouts are off in eval."""
  nn = torch.nn
  layers, channels = [], 3
  for width in _VGG16_D:
    if width == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      channels = width
  model = nn.Module()
  model.features = nn.Sequential(*layers)
  model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
  model.classifier = nn.Sequential(
    nn.Linear(512 * 7 * 7, 4096),
    nn.ReLU(True),
    nn.Dropout(),
    nn.Linear(4096, 4096),
    nn.ReLU(True),
    nn.Dropout(),
    nn.Linear(4096, 1000),
  )
  for module in model.modules():
    if isinstance(module, nn.Conv2d):
      nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
      nn.init.normal_(module.weight, 0.0, 0.01)
  return model.eval()


@pytest.fixture(scope="module")
def torch_vgg():
  """The torchvision-layout VGG16, random weights and biases, eval mode (dropout off)."""
  torch = _torch()
  torch.manual_seed(0)
  torch.set_num_threads(2)
  model = _vgg16_torchvision_layout(torch)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        module.bias.normal_(0.0, 0.05)
  return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, torch_vgg) -> dict:
  """The stand-in saved as torchvision's state dict and converted; what the tests read of it is
  kept in memory (the .npz's arrays, the metadata, the .pth's sha256 and the loaded Flax model)
  and both files are removed at once, so that only the StyleGAN layout test has VGG16s on disk."""
  torch = _torch()
  with scratch.scratch_dir(tmp_path_factory, "vgg", 2 * scratch.VGG16_BYTES) as folder:
    src, out = str(folder / "vgg16-random.pth"), str(folder / "vgg16.npz")
    torch.save(torch_vgg.state_dict(), src)
    meta = convert_vgg16.convert(src, out)
    return {
      "meta": meta,
      "src_sha256": _sha256(src),
      "arrays": _npz_arrays(out),
      "model": vgg.load_vgg16(out),
    }


@pytest.fixture(scope="module")
def flax_vgg(converted) -> vgg.Vgg16Features:
  return converted["model"]


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files if not k.startswith("__")}


def _check_mapping(arrays: dict[str, np.ndarray], convs: list, fcs: list) -> None:
  """Every converted array equals its source tensor: conv (O, I, kh, kw) -> kernel[kh, kw, I, O],
  linear (out, in) -> kernel[in, out], biases as they are."""
  want = {}
  for name, module in [(f"conv{i}", m) for i, m in enumerate(convs, 1)] + [
    ("fc1", fcs[0]),
    ("fc2", fcs[1]),
  ]:
    w = module.weight.detach().numpy()
    want[f"params/{name}/kernel"] = np.einsum("oihw->hwio" if w.ndim == 4 else "oi->io", w)
    want[f"params/{name}/bias"] = module.bias.detach().numpy()
  assert sorted(arrays) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(arrays[key], value, err_msg=key)


# ----------------------------------------------------------------------------------------------
# The converter.


def test_converter_maps_torchvision_state_dict(converted, torch_vgg):
  meta = converted["meta"]
  convs = [m for m in torch_vgg.features if m.__class__.__name__ == "Conv2d"]
  assert len(convs) == 13
  _check_mapping(converted["arrays"], convs, [torch_vgg.classifier[0], torch_vgg.classifier[3]])
  assert meta["source_layout"] == "torchvision" and meta["resize"] == "torchvision"
  assert meta["source_kind"] == "state_dict"
  assert meta["source_sha256"] == converted["src_sha256"]
  assert meta["dropped_tensors"] == ["classifier.6.bias", "classifier.6.weight"]


def _stylegan_layers(model):
  """NVIDIA's `layers` submodule made of the torch VGG16's modules (the same tensors), plus
  LPIPS' five 1x1 linear heads."""
  torch = _torch()
  layers = torch.nn.Module()
  convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
  for i, conv in enumerate(convs, 1):
    setattr(layers, f"conv{i}", conv)
  for i, j in enumerate((0, 3, 6), 1):
    setattr(layers, f"fc{i}", model.classifier[j])
  for i, channels in enumerate((64, 128, 256, 512, 512)):
    setattr(layers, f"lpips{i}", torch.nn.Conv2d(channels, 1, 1, bias=False))
  return layers, convs


def test_converter_reads_stylegan_torchscript_layout(tmp_path_factory, torch_vgg, converted):
  torch = _torch()

  class Vgg16StyleGan(torch.nn.Module):
    def __init__(self, layers):
      super().__init__()
      self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return self.layers.fc3(torch.relu(self.layers.fc2(torch.relu(self.layers.fc1(x)))))

  layers, convs = _stylegan_layers(torch_vgg)
  scripted = torch.jit.trace(Vgg16StyleGan(layers).eval(), torch.zeros(1, 25088))
  with scratch.scratch_dir(tmp_path_factory, "vgg_pt", 2 * scratch.VGG16_BYTES) as folder:
    src = str(folder / "vgg16.pt")
    scripted.save(src)
    assert any(k.startswith("layers.lpips4") for k in torch.jit.load(src).state_dict())
    out = str(folder / "from_pt.npz")
    subprocess.run(  # the command line, as the README gives it
      [sys.executable, "-m", "lct_jax.tools.convert_vgg16", f"--input={src}", f"--output={out}"],
      cwd=REPO,
      check=True,
      capture_output=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    _check_mapping(_npz_arrays(out), convs, [layers.fc1, layers.fc2])
    with np.load(out) as data:
      meta = npz_io.load_meta(data)
    assert meta["source_layout"] == "stylegan2-ada" and meta["resize"] == "tf1"
    assert meta["source_kind"] == "torchscript" and meta["source_sha256"] == _sha256(src)
    assert meta["dropped_tensors"] == sorted(
      ["layers.fc3.weight", "layers.fc3.bias"] + [f"layers.lpips{i}.weight" for i in range(5)]
    )
    assert meta["params_sha256"] == converted["meta"]["params_sha256"]  # the same numbers


def test_converter_rejects_an_unknown_layout(tmp_path):
  torch = _torch()
  src = str(tmp_path / "not_vgg.pth")
  torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(2)}, src)
  with pytest.raises(ValueError, match="not a VGG16 file") as err:
    convert_vgg16.convert(src, str(tmp_path / "out.npz"))
  assert src in str(err.value) and "conv.weight" in str(err.value)
  assert not os.path.exists(tmp_path / "out.npz")


# ----------------------------------------------------------------------------------------------
# The network.


def _torch_features(model, x_nchw):
  """VGG16's forward up to classifier[:5] (fc1, ReLU, dropout, fc2, ReLU)."""
  torch = _torch()
  with torch.no_grad():
    pooled = model.avgpool(model.features(x_nchw))
    return model.classifier[:5](torch.flatten(pooled, 1)).numpy()


def _relative_error(got: np.ndarray, ref: np.ndarray) -> float:
  return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


def test_stand_in_is_torchvision_vgg16(torch_vgg):
  """The stand-in is torchvision's VGG16: the same state-dict names and shapes and, holding the
  stand-in's tensors, the same output. Skips where torchvision does not import."""
  torch = _torch()
  torchvision = pytest.importorskip(
    "torchvision", reason="torchvision does not import here", exc_type=Exception
  )
  reference = torchvision.models.vgg16(weights=None).eval()
  ours = torch_vgg.state_dict()
  assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == {
    k: tuple(v.shape) for k, v in ours.items()
  }
  reference.load_state_dict(ours)
  x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 3, 64, 48)).astype(np.float32))
  with torch.no_grad():
    pooled = torch.flatten(torch_vgg.avgpool(torch_vgg.features(x)), 1)
    np.testing.assert_allclose(
      torch_vgg.classifier(pooled).numpy(), reference(x).numpy(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("hw", [(224, 224), (64, 48)])  # 64x48: a 2x1 map pooled to 7x7
def test_network_matches_torch(flax_vgg, torch_vgg, hw):
  torch = _torch()
  x = np.random.default_rng(0).normal(size=(2, 3, *hw)).astype(np.float32)
  ref = _torch_features(torch_vgg, torch.from_numpy(x))
  got = np.asarray(flax_vgg.module.apply(flax_vgg.variables, x.transpose(0, 2, 3, 1)))
  assert got.shape == ref.shape == (2, vgg.FEATURE_DIM)
  assert (ref > 0).mean() > 0.1 and (ref == 0).any()  # after the ReLU, not degenerate
  rel = _relative_error(got, ref)
  print(f"{hw}: relative error {rel:.3g}")
  assert rel < 1e-4


def test_features_of_uint8_images_match_torchvision_pipeline(flax_vgg, torch_vgg):
  """uint8 -> torch interpolate (bilinear, no antialias) -> /255 -> ImageNet mean/std -> VGG16."""
  torch = _torch()
  import torch.nn.functional as F

  images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
  mean = torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1)
  ref = _torch_features(torch_vgg, (x / 255 - mean) / std)
  got = np.asarray(flax_vgg.features(images))
  assert flax_vgg.resize == "torchvision"
  assert _relative_error(got, ref) < 1e-4


# ----------------------------------------------------------------------------------------------
# The two resizes (on 0..255 floats, as the pipeline runs them).

SIZES = [(16, 16), (37, 500), (300, 260), (224, 224), (225, 223)]  # up, mixed, down, same, +-1


def _images(hw: tuple[int, int], seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(2, *hw, 3)).astype(np.float32)


def test_resize_torchvision_equals_torch_interpolate():
  torch = _torch()
  import jax
  import torch.nn.functional as F

  for i, hw in enumerate(SIZES):
    x = _images(hw, i)
    ref = F.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2),
      size=(224, 224),
      mode="bilinear",
      align_corners=False,
      antialias=False,
    )
    got = np.asarray(jax.jit(lambda a: vgg.resize(a, "torchvision"))(x))
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)


def test_resize_tf1_equals_tensorflow_resize_bilinear():
  tf = pytest.importorskip("tensorflow")
  import jax

  for i, hw in enumerate(SIZES):
    x = _images(hw, i)
    ref = tf.compat.v1.image.resize_bilinear(
      x, (224, 224), align_corners=False, half_pixel_centers=False
    ).numpy()
    got = np.asarray(jax.jit(lambda a: vgg.resize(a, "tf1"))(x))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=str(hw))
    if hw != (224, 224):  # the two modes sample different points
      assert np.abs(got - np.asarray(vgg.resize(x, "torchvision"))).max() > 1


def test_missing_weights_give_the_conversion_command(tmp_path):
  missing = str(tmp_path / "nope" / "vgg16.npz")
  with pytest.raises(inception.WeightsNotFoundError) as err:
    vgg.load_vgg16(missing)
  assert f"python -m lct_jax.tools.convert_vgg16 --input=VGG16_FILE --output={missing}" in str(
    err.value
  )
  assert "vgg16.pt" in str(err.value) and "vgg16-397923af.pth" in str(err.value)

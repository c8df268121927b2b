"""Helper of the tests that write big files (VGG16 weights are ~0.5 GB a copy): a folder under
pytest's basetemp that is removed when the `with` block ends, after a check that the disk has room.

pytest keeps a module- or session-scoped folder until the session ends, and a full disk does not
fail one test cleanly: torch.save aborts the whole process. So the folder is checked for room
first (a failure naming the folder and the bytes) and removed as soon as its fixture is done.
"""

import contextlib
import shutil

import pytest

# One VGG16 weights file (.pth, TorchScript .pt or converted .npz): ~0.55 GB, fc1 alone being
# 25088 x 4096 float32.
VGG16_BYTES = 0.56e9


@contextlib.contextmanager
def scratch_dir(tmp_path_factory, name: str, need_bytes: float):
  path = tmp_path_factory.mktemp(name)
  free = shutil.disk_usage(path).free
  if free < need_bytes:
    shutil.rmtree(path, ignore_errors=True)
    pytest.fail(
      f"{path}: {free / 1e9:.2f} GB free, this fixture writes {need_bytes / 1e9:.2f} GB "
      "(set --basetemp to a larger disk)"
    )
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)

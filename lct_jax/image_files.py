"""The eval job's image files: the JPEG round trip of the paper's protocol and the sample export.

Owns `jpeg_roundtrip` (PIL, quality 75, 4:2:0, what the paper's `Image.save("x.jpg")` does),
`NpzStreamWriter` (uint8 samples streamed into an .npz in the guided-diffusion evaluator's `arr_0`
layout, renamed when complete) and `SampleExporter` (eval.export: PNGs named by global sample
index, or one .npz per process).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import zipfile
from typing import Any

import jax
import numpy as np
from PIL import Image

JPEG_QUALITY = 75  # PIL's default, what the paper's `Image.save("x.jpg")` uses


def jpeg_roundtrip(
  images: np.ndarray, pool: concurrent.futures.Executor | None = None
) -> np.ndarray:
  """Each uint8 (H, W, 3) image saved as JPEG quality 75 with PIL (default 4:2:0) and read back."""

  def one(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    with Image.open(buf) as decoded:
      return np.asarray(decoded.convert("RGB"))

  mapped = pool.map(one, images) if pool is not None else map(one, images)
  return np.stack(list(mapped)) if len(images) else images


class NpzStreamWriter:
  """Writes uint8 images to an .npz (`arr_0` (N, H, W, C), `indices` (N,)) batch by batch.

  `arr_0` is the layout of the guided-diffusion evaluator's sample batches. The archive is
  streamed (never held in memory) into a temporary file and renamed when complete.
  """

  def __init__(self, path: str, count: int, image_shape: tuple[int, ...]):
    self.path, self.count, self.written, self.indices = path, count, 0, []
    self._tmp = f"{path}.tmp-{os.getpid()}"
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
    header = {"descr": "|u1", "fortran_order": False, "shape": (count, *image_shape)}
    np.lib.format.write_array_header_2_0(self._member, header)

  def write(self, images: np.ndarray, indices: np.ndarray) -> None:
    self._member.write(np.ascontiguousarray(images, np.uint8).tobytes())
    self.written += len(images)
    self.indices.extend(int(i) for i in indices)

  def close(self) -> None:
    if self.written != self.count:
      raise RuntimeError(f"{self.path}: wrote {self.written} images, header says {self.count}")
    self._member.close()
    buf = io.BytesIO()
    np.save(buf, np.asarray(self.indices, np.int64))
    self._zip.writestr("indices.npy", buf.getvalue())
    self._zip.close()
    os.replace(self._tmp, self.path)


# eval.export: "" (nothing), "png" (one file per sample) or "npz" (one archive per process).
EXPORTS = ("", "png", "npz")


class SampleExporter:
  """eval.export: PNGs named by global index, or one streamed .npz per process ("" = nothing)."""

  def __init__(self, kind: str, out_dir: str, run_name: str, n: int, batch: int):
    self.kind, self.n, self.batch = kind, n, batch
    self.folder = os.path.join(out_dir, f"{run_name}_samples")
    p, count = jax.process_index(), jax.process_count()
    self.npz_path = self.folder + ("" if count == 1 else f".p{p:03d}of{count:03d}") + ".npz"
    self._npz: NpzStreamWriter | None = None

  def _local_count(self, sharding: jax.sharding.Sharding) -> int:
    """How many of the n samples land on this process's devices (the npz header needs it)."""
    shards = sharding.addressable_devices_indices_map((self.batch,)).values()
    slices = {s[0].start or 0: s[0].stop or self.batch for s in shards}
    return sum(
      max(0, min(stop, self.n - start) - off)
      for start in range(0, self.n, self.batch)
      for off, stop in slices.items()
    )

  def write(
    self, start: int, rows: list[tuple[int, np.ndarray]], valid: dict[int, int], sharding: Any
  ) -> None:
    """This process's rows of the batch at `start`; `valid[off]` of the rows at `off` count."""
    if not self.kind:
      return
    if self.kind == "npz" and self._npz is None:
      os.makedirs(os.path.dirname(self.npz_path), exist_ok=True)
      shape = rows[0][1].shape[1:]
      self._npz = NpzStreamWriter(self.npz_path, self._local_count(sharding), shape)
    for off, images in rows:
      images = images[: valid[off]]
      indices = np.arange(start + off, start + off + len(images))
      if self._npz is not None:
        self._npz.write(images, indices)
      elif self.kind == "png":
        os.makedirs(self.folder, exist_ok=True)
        for i, image in zip(indices, images):
          Image.fromarray(image).save(os.path.join(self.folder, f"{i:06d}.png"))

  def close(self) -> None:
    if self._npz is not None:
      self._npz.close()

"""Logs of a training run: clu metric writers, the resolved config, and sample-image grids.

Owns: the writer (TensorBoard event files + log lines on process 0, log lines only elsewhere),
`workdir/config.json` (written atomically; a workdir holding another config's checkpoints is
refused with the differing keys named), and uint8 image grids saved as PNG and to TensorBoard.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from PIL import Image

# Keys that may change between the runs of one workdir: they do not change what is trained.
RESUMABLE_PREFIXES = (
  "train.log_every_steps",
  "train.sample_every_steps",
  "train.max_consecutive",
  "train.microbatches",
  "train.stop_after_steps",
  "train.num_grid_samples",
  "data.encode_config",
  "ckpt.",
  "eval.",
  "mesh.",
  "data.dir",
  "data.worker_count",
)


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """clu's default writer: event files and log lines on process 0, log lines only elsewhere."""
  return metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"group.key": value} with tuples as lists (JSON-comparable)."""
  return _flatten(json.loads(config.to_json()))


def check_workdir(
  workdir: str,
  config: ml_collections.ConfigDict,
  has_checkpoints: bool,
) -> None:
  """Refuses to resume checkpoints that another config wrote.

  Args:
    workdir: the run's folder (its config.json is compared).
    config: the config of this job.
    has_checkpoints: whether there is anything to resume; without it nothing is checked.

  Raises:
    ValueError: naming each differing key with both values; nothing in the workdir is touched.
  """
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoints and os.path.exists(path)):
    return
  with open(path) as f:
    old = _flatten(json.load(f))
  new = flat_config(config)
  diffs = [
    f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
    for k in sorted(set(old) | set(new))
    if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_PREFIXES)
  ]
  if diffs:
    raise ValueError(
      f"workdir {workdir} holds checkpoints of another config ({'; '.join(diffs)}); "
      "use a new --workdir or the original config"
    )


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """workdir/config.json (process 0; atomic rename)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json(indent=2))
  os.replace(path + ".tmp", path)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """Tiles uint8 images (N, H, W, C) into one (rows*H, cols*W, 3) image; 1 channel -> gray RGB."""
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  cols = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for k in range(n):
    r, q = divmod(k, cols)
    grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = images[k]
  return grid


def sample_grid(images: np.ndarray, num_classes: int = 0, class_label: int = -1) -> np.ndarray:
  """The grid of samples 0..N-1: one row per class when sample i is of class i mod num_classes.

  Row r of a class-conditional grid holds samples r, r + K, r + 2K, ... (all of class r); the
  samples past the last multiple of K are left out. Otherwise (unconditional, one chosen class,
  or fewer samples than classes) it is `image_grid` of the samples in order.
  """
  images = np.asarray(images)
  n = len(images)
  if num_classes < 1 or class_label >= 0 or n < num_classes:
    return image_grid(images)
  per_class = n // num_classes
  rows = images[: per_class * num_classes].reshape(per_class, num_classes, *images.shape[1:])
  return image_grid(rows.swapaxes(0, 1).reshape(-1, *images.shape[1:]), columns=per_class)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 (H, W, 3) image as PNG (atomic rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)

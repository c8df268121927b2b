"""The latent dataset on disk: TFDS-format ArrayRecord shards of VAE posterior moments.

This module owns the file layout and the example format; the encode job (`lct_jax.io.encoding`)
decides what goes in. One dataset is one folder:

  latent_moments-train.array_record-00000-of-00042 ...   the shards (TFDS naming)
  dataset_info.json, features.json                        TFDS metadata, written last
  latent_stats.json                                       lct_jax.io.latents
  encode_manifests/shard-00000-of-00042.json ...          per-shard bookkeeping (resume)

and `tfds.builder_from_directory(folder).as_data_source()["train"]` (or `open_latent_dataset`)
reads it with random access, without TensorFlow, for grain. Examples, in source order:

  mean, std                 float32 (H, W, C)  posterior moments, raw VAE scale
  sample                    float32 (H, W, C)  one frozen posterior draw, mean + std * eps
                                               (docs/method.md §3.0, §9.16;
                                               eps: encoding.frozen_eps)
  flipped_mean, flipped_std, flipped_sample    same for the h-flipped image (only if encoded)
  label                     int64              class label, -1 when the source has none
  id                        text               relative path / source index of the image
  index                     int64              position of the image in the source listing

The shards are written directly (ArrayRecord + TFDS's own example serializer and DatasetInfo)
rather than through `GeneratorBasedBuilder.download_and_prepare`, because that writes all shards
in one go and shuffles them; here each shard is written under a temporary name and renamed when
complete, so an interrupted job resumes shard by shard and reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

DATASET_NAME = "latent_moments"
SPLIT = "train"
VERSION = "1.0.0"
MANIFEST_DIR = "encode_manifests"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
MOMENT_KEYS = ("mean", "std", "sample")
FLIPPED_KEYS = tuple("flipped_" + k for k in MOMENT_KEYS)


def make_features(latent_shape: Sequence[int], with_flipped: bool) -> Any:
  """The tfds FeaturesDict of one example (see the module docstring)."""
  import tensorflow_datasets as tfds

  shape = tuple(int(s) for s in latent_shape)
  tensor = lambda: tfds.features.Tensor(shape=shape, dtype=np.float32)  # noqa: E731
  keys = MOMENT_KEYS + (FLIPPED_KEYS if with_flipped else ())
  spec = {k: tensor() for k in keys}
  spec.update(label=np.int64, id=tfds.features.Text(), index=np.int64)
  return tfds.features.FeaturesDict(spec)


def shard_filename(shard: int, num_shards: int) -> str:
  """TFDS file name of a shard."""
  return f"{DATASET_NAME}-{SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}"


def manifest_path(folder: str, shard: int, num_shards: int) -> str:
  """Per-shard bookkeeping file (examples, bytes, skipped images)."""
  return os.path.join(folder, MANIFEST_DIR, f"shard-{shard:05d}-of-{num_shards:05d}.json")


def shard_done(folder: str, shard: int, num_shards: int) -> bool:
  """A shard is complete when both its renamed file and its manifest exist."""
  return os.path.isfile(os.path.join(folder, shard_filename(shard, num_shards))) and os.path.isfile(
    manifest_path(folder, shard, num_shards)
  )


def read_manifest(folder: str, shard: int, num_shards: int) -> dict[str, Any]:
  with open(manifest_path(folder, shard, num_shards)) as f:
    return json.load(f)


def _atomic_write_json(path: str, doc: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(tmp, path)


def write_shard(
  folder: str,
  shard: int,
  num_shards: int,
  features: Any,
  examples: Sequence[dict[str, Any]],
  manifest: dict[str, Any],
) -> int:
  """Writes one shard: temporary file, manifest, then the rename that marks it complete.

  Args:
    folder: the dataset folder.
    shard: shard index.
    num_shards: total number of shards.
    features: from `make_features`.
    examples: the examples, in order.
    manifest: extra bookkeeping stored in the shard's manifest (e.g. skipped images).

  Returns:
    Bytes of serialized examples written.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  from tensorflow_datasets.core import example_serializer

  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  final = os.path.join(folder, shard_filename(shard, num_shards))
  tmp = os.path.join(folder, f".tmp-{os.getpid()}-{shard_filename(shard, num_shards)}")
  # One record per chunk for random access, uncompressed: VAE latents are float32 noise to zstd
  # (7 % smaller on random-mantissa latents) and decompression made random reads 2.5x slower
  # (benchmarks/NOTES.md). The pixel autoencoders' latents of padded digits would compress well,
  # but those sets are small.
  writer = ArrayRecordWriter(tmp, "group_size:1,uncompressed")
  num_bytes = 0
  try:
    for example in examples:
      proto = serializer.get_tf_example(features.encode_example(example))
      # deterministic: map fields in a fixed order, so a rerun writes byte-identical shards
      record = proto.SerializeToString(deterministic=True)
      num_bytes += len(record)
      writer.write(record)
  finally:
    writer.close()
  doc = dict(manifest, shard=shard, num_shards=num_shards, num_examples=len(examples))
  doc["num_bytes"] = num_bytes
  _atomic_write_json(manifest_path(folder, shard, num_shards), doc)
  os.replace(tmp, final)
  return num_bytes


def remove_stale_temporaries(folder: str, shards: Sequence[int], num_shards: int) -> list[str]:
  """Deletes temporary files a killed writer left for `shards`; returns their names.

  Only the caller's own shards: in a multi-process job another process may be writing its own.
  """
  if not os.path.isdir(folder):
    return []
  suffixes = {shard_filename(s, num_shards) for s in shards}
  stale = [
    n for n in os.listdir(folder) if n.startswith(".tmp-") and n.split("-", 2)[-1] in suffixes
  ]
  for name in stale:
    os.remove(os.path.join(folder, name))
  return stale


def read_shard(folder: str, shard: int, num_shards: int, features: Any) -> Iterator[dict[str, Any]]:
  """Yields the decoded examples of one shard (before the dataset metadata exists)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  source = ArrayRecordDataSource([os.path.join(folder, shard_filename(shard, num_shards))])
  for i in range(len(source)):
    yield features.deserialize_example_np(source[i])


def write_dataset_info(
  folder: str,
  features: Any,
  shard_lengths: Sequence[int],
  num_bytes: int,
  metadata: dict[str, Any],
  description: str,
) -> None:
  """Writes the TFDS metadata (dataset_info.json, features.json) that makes the folder readable.

  Args:
    folder: the dataset folder, holding all shards.
    features: from `make_features`.
    shard_lengths: examples per shard, in shard order.
    num_bytes: total serialized bytes.
    metadata: JSON-able dict stored as TFDS metadata (metadata.json).
    description: free text.
  """
  import tensorflow_datasets as tfds

  identity = tfds.core.DatasetIdentity(
    name=DATASET_NAME, version=VERSION, data_dir=folder, module_name=__name__
  )
  info = tfds.core.DatasetInfo(
    builder=identity,
    features=features,
    description=description,
    metadata=tfds.core.MetadataDict(metadata),
  )
  info.set_file_format("array_record")
  template = tfds.core.ShardedFileTemplate(
    data_dir=folder,
    template=FILE_TEMPLATE,
    dataset_name=DATASET_NAME,
    split=SPLIT,
    filetype_suffix="array_record",
  )
  split = tfds.core.SplitInfo(
    name=SPLIT,
    shard_lengths=[int(n) for n in shard_lengths],
    num_bytes=int(num_bytes),
    filename_template=template,
  )
  info.set_splits(tfds.core.SplitDict([split]))
  # Written into a temporary folder and moved in, dataset_info.json (the mark of a finished
  # dataset, `is_complete`) last and by an atomic rename: a kill leaves no half-written mark.
  for name in os.listdir(folder):  # left by a killed writer (only process 0 writes metadata)
    if name.startswith(".tmp-info-"):
      shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
  tmp = os.path.join(folder, f".tmp-info-{os.getpid()}")
  os.makedirs(tmp)
  info.write_to_directory(tmp)
  names = sorted(os.listdir(tmp), key=lambda n: n == "dataset_info.json")
  for name in names:
    os.replace(os.path.join(tmp, name), os.path.join(folder, name))
  os.rmdir(tmp)


def is_complete(folder: str) -> bool:
  """The encode job writes dataset_info.json last: its presence means a finished dataset."""
  return os.path.isfile(os.path.join(folder, "dataset_info.json"))


def open_latent_dataset(folder: str, split: str = SPLIT) -> Any:
  """Random-access data source over the dataset (what grain's MapDataset.source takes).

  Args:
    folder: the dataset folder (config `data.dir`).
    split: only "train" is written.

  Returns:
    A TFDS ArrayRecord data source; `source[i]` is a dict of numpy arrays (id as bytes).
  """
  import tensorflow_datasets as tfds

  if not is_complete(folder):
    raise FileNotFoundError(
      f"{folder} is not a finished latent dataset (no dataset_info.json): run or resume "
      "python -m lct_jax.encode with the same config"
    )
  return tfds.builder_from_directory(folder).as_data_source()[split]


class LatentMomentsSource:
  """grain-ready random-access source of training examples: {mean, std, sample, label, index}.

  With `use_flipped`, indices [0, N) are the originals and [N, 2N) their h-flipped copies (the
  paper's LSUN set), so shuffling mixes both. Picklable (the TFDS source is opened lazily in
  each worker).
  """

  def __init__(self, folder: str, use_flipped: bool = False):
    self.folder = folder
    self.use_flipped = use_flipped
    self._source = None
    source = self._open()
    self.num_examples = len(source)
    if use_flipped and "flipped_mean" not in source.dataset_info.features:
      raise ValueError(
        f"{folder} has no flipped copies: set data.use_flipped=False or re-encode with flip=True"
      )

  def _open(self) -> Any:
    if self._source is None:
      self._source = open_latent_dataset(self.folder)
    return self._source

  def __len__(self) -> int:
    return self.num_examples * (2 if self.use_flipped else 1)

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return tuple(self._open().dataset_info.features["mean"].shape)

  def read_moments(
    self, indices: Sequence[int], keys: Sequence[str], labels: bool = False
  ) -> dict[str, np.ndarray]:
    """Rows `indices` stacked: {key: float32 (n, H, W, C)} for each of `keys` ("mean", "std",
    "sample"; a flipped copy's row holds its flipped_* fields), and with `labels` also
    "label": int64 (n,) (-1 where the source had none).

    The training input pipeline's batched read: it parses only the fields it needs straight from
    the serialized tf.Example (float lists), which is several times faster than TFDS's generic
    per-example decoding of every field (benchmarks/input_pipeline.py).
    """
    from tensorflow_datasets.proto import tf_example_pb2

    records = self._open().data_source
    shape = self.latent_shape
    out = {k: np.empty((len(indices), *shape), np.float32) for k in keys}
    if labels:
      out["label"] = np.empty((len(indices),), np.int64)
    size = int(np.prod(shape))
    for row, i in enumerate(indices):
      i = int(i)
      flipped = i >= self.num_examples
      feature = tf_example_pb2.Example.FromString(
        records[i - self.num_examples if flipped else i]
      ).features.feature
      for k in keys:
        values = feature[("flipped_" if flipped else "") + k].float_list.value
        if len(values) != size:
          raise ValueError(
            f"{self.folder}: example {i} holds {len(values)} floats for {k!r}, expected {size} "
            f"for its declared shape {shape}: not written by lct_jax's encode job?"
          )
        out[k][row] = np.asarray(values, np.float32).reshape(shape)
      if labels:
        out["label"][row] = feature["label"].int64_list.value[0]
    return out

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    flipped = i >= self.num_examples
    ex = self._open()[i - self.num_examples if flipped else i]
    prefix = "flipped_" if flipped else ""
    moments = {k: ex[prefix + k] for k in MOMENT_KEYS}
    return dict(moments, label=ex["label"], index=np.int64(i))

  def __getstate__(self) -> dict[str, Any]:
    return dict(self.__dict__, _source=None)

  def __repr__(self) -> str:
    return f"LatentMomentsSource({self.folder!r}, use_flipped={self.use_flipped})"

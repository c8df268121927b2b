"""The training input pipeline: the encode job's latent shards, read with grain.

- A deterministic grain `MapDataset` over the examples, shuffled afresh each epoch. Global batch
  s is positions [s*B, (s+1)*B) of the shuffled stream; process p reads only its rows
  [p*B/P, (p+1)*B/P). The batches and their order do not depend on the number of processes or
  grain workers.
- One batched read per element, and one vectorized conversion to the normalized training latent
  of docs/method.md §3.0: the stored posterior draw or mean, or a fresh draw mean + std * eps
  seeded by the row's global position.
- `GlobalBatches` turns each process's rows into one global jax.Array and counts the batches it
  hands out; a checkpoint stores that count and resumes at the next unseen batch.
"""

import functools
import json
import os
import queue
import sys
import threading
import time
from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from lct_jax.core import mesh as mesh_lib
from lct_jax.io import latent_dataset, latents

# Separate generator streams for the epoch shuffles and the posterior draws (seeded by the
# epoch and by the stream position, which would otherwise coincide for small numbers).
_SHUFFLE, _POSTERIOR = 0, 1
# The stored fields each data.latent mode reads; the first is the row (before a fresh draw).
_FIELDS = {"sample": ("sample",), "mean": ("mean",), "fresh": ("mean", "std")}


class ReadTrainingBatch(grain.transforms.MapWithIndex):
  """Element s of this process -> {"x": the normalized training latents of its rows} (and
  "label": their int32 class labels when `num_classes` > 0).

  The stream is the dataset's examples in a fresh random order each epoch (epoch e: the
  permutation of a generator seeded by (seed, shuffle, e)), epochs back to back; element s of
  process p is chunk j = s*P + p of B/P consecutive positions. The rows are read in one batched
  call and normalized in one vectorized pass. What a row is (`latent`, config data.latent): the
  frozen posterior draw the encode job stored ("sample"), the posterior mean ("mean"), or
  ("fresh") mean + std * eps with eps from a generator seeded by (seed, posterior, q) for the row
  at global position q: the same draw for any number of processes or workers, and a fresh one for
  every position of every epoch.
  """

  def __init__(
    self,
    source: latent_dataset.LatentMomentsSource,
    stats: latents.LatentStats,
    *,
    rows: int,
    sigma_data: float,
    latent: str,
    seed: int,
    process_index: int,
    process_count: int,
    num_classes: int = 0,
  ):
    self.source = source
    self.num_classes = num_classes
    self.stats = stats
    self.rows = rows
    self.sigma_data = sigma_data
    self.latent = latent
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count

  @functools.lru_cache(maxsize=4)  # a batch spans at most two epochs; prefetch threads share it
  def epoch_order(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the dataset's examples."""
    return np.random.default_rng([self.seed, _SHUFFLE, epoch]).permutation(len(self.source))

  def positions(self, s: int) -> np.ndarray:
    """Global stream positions of the rows of this process's element s."""
    first = (s * self.process_count + self.process_index) * self.rows
    return np.arange(first, first + self.rows, dtype=np.int64)

  def map_with_index(self, s: int, element) -> dict:
    del element  # the element is its own index; everything follows from s
    q = self.positions(s)
    epochs, offsets = np.divmod(q, len(self.source))
    indices = np.empty_like(q)
    for e in np.unique(epochs):
      at = epochs == e
      indices[at] = self.epoch_order(int(e))[offsets[at]]
    keys = _FIELDS[self.latent]
    m = self.source.read_moments(indices, keys, labels=self.num_classes > 0)
    z = m[keys[0]]
    if self.latent == "fresh":
      shape = z.shape[1:]
      eps = np.stack(
        [
          np.random.default_rng([self.seed, _POSTERIOR, g]).standard_normal(shape, np.float32)
          for g in q
        ]
      )
      z = z + m["std"] * eps
    out = {"x": np.asarray(latents.normalize(z, self.stats, self.sigma_data), np.float32)}
    if self.num_classes:
      out["label"] = self._checked_labels(m["label"], indices)
    return out

  def _checked_labels(self, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    bad = (labels < 0) | (labels >= self.num_classes)
    if bad.any():
      j = int(np.argmax(bad))
      raise ValueError(
        f"data.num_classes={self.num_classes}, but example {int(indices[j])} of "
        f"{self.source.folder} has label {int(labels[j])}"
        + (
          ": the dataset has no labels (encode with label_key, labels_from_subdirs or a "
          "labelled source), or set data.num_classes=0"
          if labels[j] < 0
          else ""
        )
      )
    return labels.astype(np.int32)


def make_loader(
  data_dir: str,
  stats: latents.LatentStats,
  *,
  global_batch_size: int,
  seed: int,
  sigma_data: float = 0.5,
  use_flipped: bool = False,
  latent: str = "sample",
  num_examples: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  num_classes: int = 0,
) -> grain.MapDataset:
  """This process's rows of every global batch: element s holds rows [p*B/P, (p+1)*B/P) of batch s.

  Args:
    data_dir: the latent dataset (config data.dir).
    stats: its latent statistics.
    global_batch_size: B, rows of a global batch over all processes.
    seed: shuffle (a new permutation each epoch) and posterior-draw seed.
    sigma_data: target std of the normalized latents.
    use_flipped: also read the h-flipped copies.
    latent: "sample" (the stored frozen posterior draw), "mean", or "fresh" (mean + std * eps,
      a new draw at every stream position); `stats` must be over the same (latents.LATENT_MODES).
    num_examples: the epoch length the curriculum's K was computed from (data.num_examples,
      docs/method.md 2.2: K = floor(len(dataset) / B) * epochs); must equal the dataset's length
      (originals and flips with use_flipped). None skips the check (K given directly).
    process_index: p; defaults to jax.process_index().
    process_count: P; defaults to jax.process_count().
    num_classes: K > 0 also reads the rows' labels, which must lie in [0, K) (data.num_classes).

  Returns:
    An infinite grain MapDataset of {"x": float32 (B/P, H, W, C)} (and "label": int32 (B/P,)).

  Raises:
    ValueError: naming data.dir / train.global_batch_size / data.latent / data.num_examples for
      an empty dataset, a global batch larger than the dataset, one the processes cannot split
      evenly, or one whose length is not data.num_examples.
  """
  import tensorflow_datasets as tfds

  # Checked before the source opens: array_record refuses a split without examples obscurely.
  if tfds.builder_from_directory(data_dir).info.splits[latent_dataset.SPLIT].num_examples == 0:
    raise ValueError(f"data.dir={data_dir!r} holds no examples: re-run the encode job")
  if latent not in latents.LATENT_MODES:
    raise ValueError(f"data.latent={latent!r}: expected one of {', '.join(latents.LATENT_MODES)}")
  source = latent_dataset.LatentMomentsSource(data_dir, use_flipped)
  if num_examples is not None and num_examples != len(source):
    flips = " (originals and their flips: data.use_flipped=True)" if use_flipped else ""
    raise ValueError(
      f"data.num_examples={num_examples}, but data.dir={data_dir!r} holds {len(source)} training "
      f"examples{flips}; the curriculum's total steps K = floor(data.num_examples / "
      "train.global_batch_size) * train.num_epochs count epochs of the data: set "
      f"data.num_examples={len(source)}, or give K as train.total_steps"
    )
  if global_batch_size > len(source):
    raise ValueError(
      f"train.global_batch_size={global_batch_size} exceeds the {len(source)} examples in "
      f"data.dir={data_dir!r}"
    )
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(
      f"train.global_batch_size={global_batch_size} does not split over {count} processes"
    )
  read = ReadTrainingBatch(
    source,
    stats,
    rows=global_batch_size // count,
    sigma_data=sigma_data,
    latent=latent,
    seed=seed,
    process_index=p,
    process_count=count,
    num_classes=num_classes,
  )
  # An endless stream of element numbers s; the transform turns each into its rows.
  ds = grain.MapDataset.range(sys.maxsize)
  return ds.map_with_index(read)


# How long close()/set_state() wait for the read-ahead thread to finish the batch it is reading.
_JOIN_TIMEOUT_S = 60.0


class _ReaderError:
  """An exception of the read-ahead thread, carried to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class GlobalBatches:
  """Global, sharded batches from this process's rows (`make_loader`), resumable by batch count.

  `get_state` / `set_state` exchange JSON bytes, which the checkpoints store once for all
  processes (`io.checkpoint`): the state is the number of batches the train step consumed, the
  same on every process and for any number of workers. `wait_s` accumulates the
  host time spent waiting for data.

  A background thread turns the reader's numpy batches into global device arrays
  (`jax.make_array_from_process_local_data`) up to `prefetch` batches ahead, so the training loop
  only takes a ready batch (on the 2-core CPU demo the array creation was 1.3 ms of the loop's
  1.6 ms data wait per step). Read-ahead batches are dropped by `set_state`, so the position
  stays the batches handed out; an error in the reader is raised by the next `next()`.
  """

  def __init__(
    self, local_batches: grain.MapDataset, mesh: Mesh, worker_count: int = 0, prefetch: int = 2
  ):
    self._batches = local_batches
    self._worker_count = worker_count
    self._sharding = mesh_lib.batch_sharding(mesh)
    self._prefetch = prefetch
    self._next = 0
    self._ready = None  # queue of device batches (or a _ReaderError), filled by the thread
    self._stop = None
    self._thread = None
    self.wait_s = 0.0

  def _start(self, position: int) -> Iterator[dict]:
    # Threads read a few batches ahead; worker processes each produce whole batches, which grain
    # interleaves back in order. Reading holds the GIL for much of a batch, so threads beyond half
    # the cores slow it down: on 2 cores 1 thread gave 255 batches/s, 4 threads 158
    # (benchmarks/NOTES.md).
    threads = max(1, min(4, (os.cpu_count() or 2) // 2))
    ds = self._batches[position:].to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)
    )
    if self._worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(ds)

  def _fill(self, position: int, ready: queue.Queue, stop: threading.Event) -> None:
    """The thread: device batches from `position` on into `ready` until `stop` (a fresh queue
    and event per start)."""

    def put(item) -> None:
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return
        except queue.Full:
          continue

    local_batches = None
    try:
      local_batches = self._start(position)
      while not stop.is_set():
        local = next(local_batches)
        put(
          {
            k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
            for k, v in local.items()
          }
        )
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
      put(_ReaderError(e))
    finally:
      if hasattr(local_batches, "close"):  # grain's read threads stop with it
        local_batches.close()

  def _shutdown(self) -> None:
    """Stops the read-ahead thread and waits for it: a daemon thread still inside jax or grain
    code when the interpreter exits aborts the process (SIGABRT after a clean preemption save)."""
    if self._stop is not None:
      self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=_JOIN_TIMEOUT_S)
    self._ready = self._stop = self._thread = None

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    t0 = time.perf_counter()
    if self._ready is None:
      self._ready, self._stop = queue.Queue(maxsize=max(1, self._prefetch)), threading.Event()
      self._thread = threading.Thread(
        target=self._fill,
        args=(self._next, self._ready, self._stop),
        name="global_batches",
        daemon=True,
      )
      self._thread.start()
    item = self._ready.get()
    if isinstance(item, _ReaderError):
      self._shutdown()
      raise item.error
    self._next += 1
    self.wait_s += time.perf_counter() - t0
    return item

  def close(self) -> None:
    """Stops the read-ahead thread and waits for it to end."""
    self._shutdown()

  @property
  def next_batch(self) -> int:
    """How many batches were handed out: the number of the next one."""
    return self._next

  def get_state(self) -> bytes:
    return json.dumps({"next_batch": self._next}).encode()

  def set_state(self, state: bytes) -> None:
    self._shutdown()
    self._next = int(json.loads(state)["next_batch"])

"""The training input pipeline: the encode job's latent shards, read with grain.

Owns: a deterministic, checkpointable grain `DataLoader` over `LatentMomentsSource` (random access,
a fresh shuffle each epoch, each process reading its own slice), the per-example conversion to the
normalized training latent of method.md section 3.0 (stored posterior mean, or a fresh draw
mean + std * eps from grain's per-record RNG), and `GlobalBatches`, which turns each process's
batch into one global jax.Array and remembers the iterator state of the last batch it handed out,
so that a checkpoint resumes exactly at the next unseen batch.
"""

import time
from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from lct_jax.core import mesh as mesh_lib
from lct_jax.io import latent_dataset, latents


class ToTrainingLatent(grain.transforms.RandomMap):
  """{mean, std, ...} -> {"x": normalized latent}; a posterior draw when `sample_posterior`."""

  def __init__(self, stats: latents.LatentStats, sigma_data: float, sample_posterior: bool):
    self.stats = stats
    self.sigma_data = sigma_data
    self.sample_posterior = sample_posterior

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    z = np.asarray(element["mean"], np.float32)
    if self.sample_posterior:
      z = z + np.asarray(element["std"], np.float32) * rng.standard_normal(z.shape, np.float32)
    x = latents.normalize(z, self.stats, self.sigma_data)
    return {"x": np.asarray(x, np.float32)}


def make_loader(
  data_dir: str,
  stats: latents.LatentStats,
  *,
  global_batch_size: int,
  seed: int,
  sigma_data: float = 0.5,
  use_flipped: bool = False,
  sample_posterior: bool = False,
  worker_count: int = 0,
) -> grain.DataLoader:
  """A grain DataLoader of this process's slice of the global batch, forever, reshuffled per epoch.

  Raises:
    ValueError: naming data.dir / train.global_batch_size for an empty dataset or a global batch
      larger than the dataset (nothing could be trained on).
  """
  source = latent_dataset.LatentMomentsSource(data_dir, use_flipped)
  if len(source) == 0:
    raise ValueError(f"data.dir={data_dir!r} holds no examples: re-run the encode job")
  if global_batch_size > len(source):
    raise ValueError(
      f"train.global_batch_size={global_batch_size} exceeds the {len(source)} examples in "
      f"data.dir={data_dir!r}"
    )
  per_process = global_batch_size // jax.process_count()
  sampler = grain.samplers.IndexSampler(
    len(source),
    shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
    shuffle=True,
    num_epochs=None,
    seed=seed,
  )
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[
      ToTrainingLatent(stats, sigma_data, sample_posterior),
      grain.transforms.Batch(per_process, drop_remainder=True),
    ],
    worker_count=worker_count,
  )


class GlobalBatches:
  """Global, sharded batches from a grain loader, with the state of the last batch handed out.

  `get_state` / `set_state` follow grain's iterator protocol, so grain's orbax checkpoint handler
  saves this object: the saved state is that after the last batch the train step consumed.
  `wait_s` accumulates the host time spent waiting for data.
  """

  def __init__(self, loader: grain.DataLoader, mesh: Mesh):
    self._iter = iter(loader)
    self._sharding = mesh_lib.batch_sharding(mesh)
    self._state = self._iter.get_state()
    self.wait_s = 0.0

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    t0 = time.perf_counter()
    local = next(self._iter)
    self._state = self._iter.get_state()
    batch = {
      k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
      for k, v in local.items()
    }
    self.wait_s += time.perf_counter() - t0
    return batch

  def get_state(self) -> Any:
    return self._state

  def set_state(self, state: Any) -> None:
    self._iter.set_state(state)
    self._state = state

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; grain's own iterator prefetches."""
    if hasattr(self._iter, "start_prefetch"):
      self._iter.start_prefetch()

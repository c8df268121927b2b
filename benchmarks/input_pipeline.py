"""Input-pipeline throughput: the training job's own loader, timed without a train step.

  python benchmarks/input_pipeline.py                       # encodes a benchmark set first
  python benchmarks/input_pipeline.py --data_dir=DIR --global_batch_size=128 --batches=300

Reads global batches exactly as `lct_jax.training` does: grain over the encode job's
array_record shards, shuffle, per-example normalisation, `GlobalBatches` building the sharded
jax.Array. Prints one JSON line per setting: batches/s, images/s, MB/s, and the ratio to the rate
the train step consumes. That rate is --step_img_per_s; its default is the bf16 paper step at
batch 128 recorded in benchmarks/NOTES.md. A ratio >= 10 keeps the loader well ahead of the
step.

Without --data_dir it writes --num_examples random latent moments of the paper's shape (32, 32, 4)
(mean, std and a frozen draw, float32, incompressible like real SD-VAE latents) with the encode
job's own shard writer, in shards of 1,000.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from lct_jax.core import mesh as mesh_lib
from lct_jax.io import input_pipeline, latent_dataset, latents

_DATA = flags.DEFINE_string("data_dir", None, "Latent dataset; default: write a benchmark set.")
_NUM = flags.DEFINE_integer("num_examples", 10000, "Examples of the written benchmark set.")
_BATCH = flags.DEFINE_integer("global_batch_size", 128, "Rows per global batch.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Timed batches per setting.")
_WORKERS = flags.DEFINE_list("worker_counts", ["0"], "grain worker processes, one result each.")
_LATENT = flags.DEFINE_enum(
  "latent", "sample", ["sample", "mean", "fresh"], "data.latent: what a row is (README, Training)."
)
_STEP_RATE = flags.DEFINE_float(
  "step_img_per_s", 1763.0, "Images/s the train step consumes (H100, bf16, b128, 2026-11-26)."
)


def write_benchmark_set(folder: str, num_examples: int, shape=(32, 32, 4)) -> str:
  """`num_examples` random latent moments of `shape` as a finished latent dataset in `folder`."""
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  features = latent_dataset.make_features(shape, with_flipped=False)
  accs = {field: latents.MomentAccumulator(shape) for field in latents.STATS_FIELDS}
  starts = list(range(0, num_examples, 1000))
  lengths, num_bytes = [], 0
  for shard, start in enumerate(starts):
    n = min(1000, num_examples - start)
    mean = rng.standard_normal((n, *shape), np.float32)
    std = np.abs(0.1 * rng.standard_normal((n, *shape), np.float32))
    sample = mean + std * rng.standard_normal((n, *shape), np.float32)
    accs["mean"].update(mean)
    accs["sample"].update(sample)
    examples = [
      dict(mean=mean[i], std=std[i], sample=sample[i], label=-1, id=str(start + i), index=start + i)
      for i in range(n)
    ]
    num_bytes += latent_dataset.write_shard(folder, shard, len(starts), features, examples, {})
    lengths.append(n)
  common = dict(autoencoder="benchmark", weights_hash="none", resolution=8 * shape[0])
  blocks = {
    (field, False): latents.LatentStats(
      **acc.finalize(), includes_flipped=False, scale_factor=1.0, **common
    )
    for field, acc in accs.items()
  }
  latents.save_latent_stats(folder, blocks)
  metadata = dict(latent_shape=list(shape), flip=False)
  latent_dataset.write_dataset_info(folder, features, lengths, num_bytes, metadata, "benchmark")
  return folder


def time_loader(data_dir: str, batch_size: int, batches: int, workers: int, latent: str):
  """Seconds per batch for `batches` batches after 5 untimed ones (the iterator's start)."""
  stats = latents.load_latent_stats(data_dir, latent=latent)
  loader = input_pipeline.make_loader(
    data_dir, stats, global_batch_size=batch_size, seed=0, latent=latent
  )
  mesh = mesh_lib.make_mesh(-1)
  it = input_pipeline.GlobalBatches(loader, mesh, worker_count=workers)
  for _ in range(5):
    jax.block_until_ready(next(it))
  times = []
  t_all = time.perf_counter()
  for _ in range(batches):
    t0 = time.perf_counter()
    batch = next(it)
    jax.block_until_ready(batch)
    times.append(time.perf_counter() - t0)
  total = time.perf_counter() - t_all
  it.close()
  return total / batches, statistics.median(times), batch["x"]


def main(argv):
  del argv
  tmp = None
  data_dir = _DATA.value
  if not data_dir:
    tmp = tempfile.TemporaryDirectory(prefix="lct_pipeline_bench_")
    data_dir = write_benchmark_set(os.path.join(tmp.name, "latents"), _NUM.value)
  need = _STEP_RATE.value / _BATCH.value  # batches/s the train step consumes
  for workers in [int(w) for w in _WORKERS.value]:
    mean_s, median_s, x = time_loader(
      data_dir, _BATCH.value, _BATCHES.value, workers, _LATENT.value
    )
    rate = 1.0 / mean_s
    result = {
      "benchmark": "input_pipeline",
      "device_kind": jax.devices()[0].device_kind,
      "host_cpus": os.cpu_count(),
      "global_batch_size": _BATCH.value,
      "latent_shape": list(x.shape[1:]),
      "worker_count": workers,
      "latent": _LATENT.value,
      "batches_per_s": rate,
      "median_batch_s": median_s,
      "img_per_s": rate * _BATCH.value,
      "mb_per_s": rate * x.size * x.dtype.itemsize / 1e6,
      "step_img_per_s": _STEP_RATE.value,
      "ratio_to_step": rate / need,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  app.run(main)

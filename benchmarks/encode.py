"""Encode throughput (images/s) of the paper's VAE architecture at 256x256, random weights.

Runs the encode job's own batched, jitted, device-sharded encoder (lct_jax.io.encoding) on
uint8 images from the host, as the job does, with stabilityai/sd-vae-ft-ema's architecture
(built locally from its config; no weights needed). Prints one JSON line.

  python benchmarks/encode.py [--batch_size=64] [--num_batches=10] [--resolution=256]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import encoding


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=64, help="images per step, all devices")
  parser.add_argument("--num_batches", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  model = ae_lib.build_vae_model(ae_lib.SD_VAE_CONFIG, dtype=jnp.dtype(args.dtype))
  vae = ae_lib.VAEAutoencoder(model, ae_lib.init_random_vae_params(model), "random:sd-vae-ft-ema")
  encoder = encoding.ShardedEncoder(vae, args.batch_size)
  images = np.random.default_rng(0).integers(
    0, 256, (encoder.batch_size, args.resolution, args.resolution, 3), dtype=np.uint8
  )
  t0 = time.perf_counter()
  for _ in range(max(1, args.warmup)):
    mean, _ = encoder(images)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.num_batches):
    mean, _ = encoder(images)  # returns numpy: includes the device->host copy, as the job does
  seconds = time.perf_counter() - t0
  devices = jax.local_devices()
  print(
    json.dumps(
      {
        "benchmark": "encode",
        "images_per_s": args.num_batches * encoder.batch_size / seconds,
        "images_per_s_per_device": args.num_batches * encoder.batch_size / seconds / len(devices),
        "seconds": seconds,
        "warmup_seconds": compile_s,
        "resolution": args.resolution,
        "latent_shape": list(mean.shape[1:]),
        "batch_size": encoder.batch_size,
        "num_batches": args.num_batches,
        "dtype": args.dtype,
        "num_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "backend": jax.default_backend(),
        "params": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(vae.params))),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()

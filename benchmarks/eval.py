"""Eval throughput: `python -m benchmarks.eval --config=configs/ffhq.py --batch_size=16 [--nfe=2]`.

Times what the eval job does per batch (lct_jax.evaluation): sample (1 or 2 network
evaluations) -> denormalize -> VAE decode to uint8 -> FID Inception pool3 features. The work is
sharded over all local devices and the features are fetched to the host; compile is excluded.

Weights are random at the paper's shapes:

* the config's network (ffhq: DhariwalUNet on 32x32x4 latents);
* the decoder of stabilityai/sd-vae-ft-ema (built locally from its config, 256x256 images);
* the Inception from the converted weights file when it exists, random otherwise (flagged by
  "inception_weights": "random"; the cost is the same).

The float64 feature sums on the host are timed separately. Prints one JSON line.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from lct_jax import config_lib, evaluation, scoring
from lct_jax.core import mesh as mesh_lib
from lct_jax.core import sampling
from lct_jax.fid import inception, stats
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import latents

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ffhq.py", "Training config.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch (a multiple of the devices).")
_BATCHES = flags.DEFINE_integer("num_batches", 5, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed batches (the first compiles).")
_NFE = flags.DEFINE_integer("nfe", 1, "1, or 2 (with the config's first eval.sigma_mid).")
_VAE_DTYPE = flags.DEFINE_string("vae_dtype", "float32", "VAE compute dtype.")
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "Converted .npz (default path).")


def random_params(shapes, seed: int = 0):
  """Kernels N(0, 1/fan_in), scales 1, other leaves N(0, 0.01^2); numpy-drawn (fast on CPU)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, sds in traverse_util.flatten_dict(shapes).items():
    if key[-1] == "kernel":
      fan_in = int(np.prod(sds.shape[:-1]))
      flat[key] = rng.standard_normal(sds.shape) / np.sqrt(fan_in)
    elif key[-1] in ("scale", "var"):
      flat[key] = np.ones(sds.shape)
    else:
      flat[key] = 0.01 * rng.standard_normal(sds.shape)
  return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})


def load_or_random_inception(path: str | None) -> tuple[inception.FidInception, str]:
  """The converted FID Inception, or one with random weights (same cost) when none exists."""
  try:
    return inception.load_inception(path), "real"
  except inception.WeightsNotFoundError:
    module = inception.InceptionV3()
    x = jnp.zeros((1, 299, 299, 3), jnp.float32)
    variables = random_params(jax.eval_shape(module.init, jax.random.key(0), x))
    return inception.FidInception(module, variables, "random", {"random": True}), "random"


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  mesh = mesh_lib.make_mesh(config.mesh.num_devices)
  model = config_lib.build_model(config)
  shape = config_lib.example_shape(config)
  x = jnp.zeros((1, *shape), jnp.float32)
  params = random_params(
    jax.eval_shape(lambda k: model.init(k, x, jnp.zeros((1,)), train=False), jax.random.key(0))
  )["params"]
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  vae_model = ae_lib.build_vae_model(ae_lib.SD_VAE_CONFIG, dtype=jnp.dtype(_VAE_DTYPE.value))
  vae = ae_lib.VAEAutoencoder(
    vae_model, ae_lib.init_random_vae_params(vae_model), "random:sd-vae-ft-ema"
  )
  zeros = np.zeros(shape, np.float64)
  latent_stats = latents.LatentStats(
    zeros, zeros + 1, (0.0,) * shape[-1], (1.0,) * shape[-1], 2, False, vae.identity, "", 256, 1.0
  )
  run = sampling.SamplerSpec(tuple(config.eval.sigma_mid[: _NFE.value - 1]))
  generator = evaluation.ImageGenerator(model, config, run, vae, latent_stats, mesh)
  fid_model, weights_kind = load_or_random_inception(_WEIGHTS.value)
  data, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  features_fn = jax.jit(fid_model.apply, in_shardings=(repl, data), out_shardings=data)
  variables = jax.device_put(fid_model.variables, repl)
  batch = _BATCH.value

  def one_batch(start: int) -> tuple[float, float, np.ndarray, tuple[int, ...]]:
    t0 = time.perf_counter()
    images = generator(params, np.arange(start, start + batch))
    images.block_until_ready()
    t1 = time.perf_counter()
    rows = scoring.local_rows(features_fn(variables, images))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.concatenate([r for _, r in rows]), images.shape

  t0 = time.perf_counter()
  for i in range(max(1, _WARMUP.value)):
    one_batch(i * batch)
  warmup_s = time.perf_counter() - t0
  gen_s, inc_s, host_s = [], [], []
  t0 = time.perf_counter()
  for i in range(_BATCHES.value):
    g, f, feats, image_shape = one_batch((i + _WARMUP.value) * batch)
    gen_s.append(g)
    inc_s.append(f)
    t = time.perf_counter()
    stats.FeatureStats.zeros(inception.FEATURE_DIM).update(feats)
    host_s.append(time.perf_counter() - t)
  seconds = sum(gen_s) + sum(inc_s)
  devices = jax.local_devices()
  count = lambda tree: int(sum(np.size(p) for p in jax.tree_util.tree_leaves(tree)))  # noqa: E731
  print(
    json.dumps(
      {
        "benchmark": "eval",
        "samples_per_s": _BATCHES.value * batch / seconds,
        "samples_per_s_per_device": _BATCHES.value * batch / seconds / len(devices),
        "sample_decode_s_per_batch": float(np.median(gen_s)),
        "inception_s_per_batch": float(np.median(inc_s)),
        "host_feature_sums_s_per_batch": float(np.median(host_s)),
        "wall_seconds": time.perf_counter() - t0,
        "warmup_seconds": warmup_s,
        "batch_size": batch,
        "num_batches": _BATCHES.value,
        "nfe": run.nfe,
        "sigma_mids": list(run.sigma_mids),
        "latent_shape": list(shape),
        "image_shape": list(image_shape[1:]),
        "unet_params": count(params),
        "vae_params": count(vae.params),
        "model_dtype": config.model.dtype,
        "vae_dtype": _VAE_DTYPE.value,
        "inception_weights": weights_kind,
        "num_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "backend": jax.default_backend(),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)

"""Latent-outlier analysis (the paper's Fig. 1): `python -m lct_jax.analyze --config=...`.

Computes box-and-whisker statistics: quartiles, Tukey inner fences (Q1 - 1.5 IQR, Q3 + 1.5 IQR),
outer fences (Q1 - 3 IQR, Q3 + 3 IQR), outlier counts and outlier rates. They cover:

* the values of a latent dataset, raw and normalized as training sees them (docs/method.md §3.0);
* the same images in pixel space, raw and normalized: a second dataset encoded from the same
  source with `--config.autoencoder=pixel`;
* the TD values f(x + sigma_i n, sigma_i) - f(x + sigma_{i+1} n, sigma_{i+1}) of a consistency
  function on the Karras grid of N points (`td_statistics`; the paper shows N = 21).

The value statistics are written as JSON and as a PNG plot.

With `checkpoint` set to a training workdir, f is the consistency function of that run's EMA
parameters (the newest checkpoint, or `checkpoint_step`), restored read-only. The TD statistics of
the first `td_examples` analyzed latents go into the JSON under "td".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from lct_jax.io import job_logging
from lct_jax.io import latent_dataset as ld
from lct_jax.io import latents as latents_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Analysis config file.", lock_config=True)


def box_stats(values: Any) -> dict[str, Any]:
  """Box-and-whisker statistics of all entries of `values` (float64).

  Args:
    values: any array; flattened.

  Returns:
    count, mean, std, min, max, q1, median, q3 (numpy's linear-interpolation percentiles), iqr,
    inner_fences / outer_fences ([low, high]), whiskers (the most extreme values inside the inner
    fences), outliers_inner / outliers_outer (entries beyond the inner / outer fences, split in
    _low and _high) and their rates (fractions of count), kurtosis (E[(v - mean)^4] / std^4: 3
    for a Gaussian) and beyond_4_sigma (the fraction with |v - mean| > 4 std: 6.3e-5 for a
    Gaussian).
  """
  v = np.asarray(values, np.float64).ravel()
  q1, median, q3 = np.percentile(v, [25.0, 50.0, 75.0])
  iqr = q3 - q1
  inner = (q1 - 1.5 * iqr, q3 + 1.5 * iqr)
  outer = (q1 - 3.0 * iqr, q3 + 3.0 * iqr)
  inside = v[(v >= inner[0]) & (v <= inner[1])]
  out: dict[str, Any] = dict(
    count=int(v.size),
    mean=float(v.mean()),
    std=float(v.std()),
    min=float(v.min()),
    max=float(v.max()),
    q1=float(q1),
    median=float(median),
    q3=float(q3),
    iqr=float(iqr),
    inner_fences=[float(inner[0]), float(inner[1])],
    outer_fences=[float(outer[0]), float(outer[1])],
    whiskers=[float(inside.min()), float(inside.max())],
  )
  centred = v - v.mean()
  std = centred.std()
  out["kurtosis"] = float(np.mean(centred**4) / std**4) if std > 0 else float("nan")
  out["beyond_4_sigma"] = float(np.mean(np.abs(centred) > 4 * std)) if std > 0 else 0.0
  for name, (lo, hi) in (("inner", inner), ("outer", outer)):
    n_lo, n_hi = int((v < lo).sum()), int((v > hi).sum())
    out[f"outliers_{name}_low"], out[f"outliers_{name}_high"] = n_lo, n_hi
    out[f"outliers_{name}"] = n_lo + n_hi
    out[f"outlier_rate_{name}"] = (n_lo + n_hi) / v.size
  return out


def karras_sigmas(
  num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
  """The Karras grid, descending.

  sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho.

  Args:
    num_scales: N (i = 0..N-1).
    sigma_min, sigma_max, rho: grid constants.

  Returns:
    float64 (N,), sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min.
  """
  i = np.arange(num_scales, dtype=np.float64)
  a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (a + i / (num_scales - 1) * (b - a)) ** rho


def td_statistics(
  denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
  latents: Any,
  num_scales: int,
  key: jax.Array,
  *,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  batch_size: int = 64,
) -> dict[str, Any]:
  """Statistics of the TD values f(x + s_i n, s_i) - f(x + s_{i+1} n, s_{i+1}) on the Karras grid.

  One noise draw n ~ N(0, I) per example (from `key`) is shared by every sigma, as in a
  consistency-training pair.

  Args:
    denoise_fn: f(x, sigma) with x (B, H, W, C) and sigma (B,); returns (B, H, W, C).
    latents: normalized latents x (M, H, W, C).
    num_scales: N, points of the grid (N - 1 intervals).
    key: PRNG key for the noise.
    sigma_min, sigma_max, rho: the grid (docs/method.md §1).
    batch_size: examples per call of denoise_fn.

  Returns:
    sigmas (the grid), per_interval (box_stats of each interval's TD values, with sigma_i and
    sigma_{i+1}) and all (box_stats over every interval).
  """
  x = jnp.asarray(latents, jnp.float32)
  noise = jax.random.normal(key, x.shape, jnp.float32)
  sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho)

  @jax.jit
  def f_at(xb: jax.Array, nb: jax.Array, sigma: jax.Array) -> jax.Array:
    s = jnp.full((xb.shape[0],), sigma, jnp.float32)
    return denoise_fn(xb + sigma * nb, s)

  outputs = []
  for sigma in sigmas:
    parts = [
      np.asarray(f_at(x[a : a + batch_size], noise[a : a + batch_size], jnp.float32(sigma)))
      for a in range(0, x.shape[0], batch_size)
    ]
    outputs.append(np.concatenate(parts))
  td = np.stack([outputs[i] - outputs[i + 1] for i in range(num_scales - 1)])
  per_interval = [
    dict(box_stats(td[i]), index=i, sigma_i=float(sigmas[i]), sigma_next=float(sigmas[i + 1]))
    for i in range(num_scales - 1)
  ]
  return dict(
    sigmas=sigmas.tolist(), num_scales=num_scales, per_interval=per_interval, all=box_stats(td)
  )


def load_values(folder: str, indices: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """Posterior means (raw scale) and ids of the examples at `indices` of a latent dataset."""
  source = ld.open_latent_dataset(folder)
  examples = [source[int(i)] for i in indices]
  return np.stack([ex["mean"] for ex in examples]), [ex["id"].decode() for ex in examples]


def _flier_sample(values: np.ndarray, stats: dict[str, Any], k: int = 400) -> np.ndarray:
  """Up to k outliers to draw: the 20 most extreme on each side plus a random sample."""
  v = values.ravel()
  lo, hi = stats["inner_fences"]
  fliers = np.sort(v[(v < lo) | (v > hi)])
  if fliers.size > k:
    middle = np.random.default_rng(0).choice(fliers[20:-20], k - 40, replace=False)
    fliers = np.concatenate([fliers[:20], middle, fliers[-20:]])
  return fliers


def plot(panels: list[tuple[str, list[tuple[str, dict[str, Any], np.ndarray]]]], path: str) -> None:
  """Writes box plots of precomputed statistics.

  Args:
    panels: one (title, [(label, box_stats, fliers)]) per panel.
    path: the PNG file.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
  for ax, (title, boxes) in zip(axes[0], panels):
    ax.bxp(
      [
        dict(
          label=label,
          whislo=s["whiskers"][0],
          q1=s["q1"],
          med=s["median"],
          q3=s["q3"],
          whishi=s["whiskers"][1],
          fliers=fliers,
        )
        for label, s, fliers in boxes
      ],
      showfliers=True,
      flierprops=dict(marker=".", markersize=2, alpha=0.4),
    )
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def denoiser_from_workdir(workdir: str, step: int = -1) -> tuple[Callable, int, Any]:
  """f(x, sigma) of a training run's EMA parameters, restored read-only from its checkpoints.

  Args:
    workdir: the training job's --workdir (holds config.json and checkpoints/).
    step: the checkpoint's step; -1 for the newest.

  Returns:
    (f, the step restored, the run's config).
  """
  import ml_collections

  from lct_jax import config_lib, evaluation
  from lct_jax.core import karras
  from lct_jax.core import mesh as mesh_lib
  from lct_jax.io import checkpoint

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint={workdir!r}: no config.json (not a training workdir)")
  with open(path) as f:
    train_config = ml_collections.ConfigDict(json.load(f))
  reader = checkpoint.CheckpointReader(workdir)
  steps = reader.all_steps()
  if not steps or (step >= 0 and step not in steps):
    raise FileNotFoundError(f"checkpoint={workdir!r}: step {step} not among {steps}")
  step = steps[-1] if step < 0 else step
  model = config_lib.build_model(train_config)
  mesh = mesh_lib.make_mesh(1)
  params = reader.restore_fields(step, evaluation.abstract_ema(train_config, model, mesh))
  reader.close()
  ema = params["ema_params"]
  noise_cfg = config_lib.noise_config(train_config)

  # A class-conditional network is read at its null class: its unconditional F.
  classes = train_config.data.get("num_classes", 0)

  def net(x_in: jax.Array, noise_labels: jax.Array) -> jax.Array:
    extra = (jnp.full(x_in.shape[:1], classes, jnp.int32),) if classes else ()
    return model.apply({"params": ema}, x_in, noise_labels, *extra, train=False)

  return (lambda x, sigma: karras.consistency_fn(net, x, sigma, noise_cfg)), step, train_config


def analyze(config: Any) -> dict[str, Any]:
  """Runs the analysis described by `config` (see configs/analyze/fig1.py); returns the JSON doc."""
  spaces = [("latent", config.latent_dir)] + (
    [("pixel", config.pixel_dir)] if config.pixel_dir else []
  )
  sizes = {name: len(ld.open_latent_dataset(folder)) for name, folder in spaces}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"latent_dir and pixel_dir must hold the same images; sizes {sizes}")
  n = next(iter(sizes.values()))
  m = n if config.max_examples < 0 else min(n, config.max_examples)
  indices = np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))
  result: dict[str, Any] = {"num_examples": int(indices.size), "of": n, "spaces": {}}
  panels: dict[str, list] = {"raw": [], "normalized": []}
  ids_seen = None
  for name, folder in spaces:
    raw, ids = load_values(folder, indices)
    if ids_seen is not None and ids != ids_seen:
      raise ValueError(
        "latent_dir and pixel_dir hold different images (ids differ); encode both "
        "from the same source with the same max_examples"
      )
    ids_seen = ids
    stats = latents_lib.load_latent_stats(folder, use_flipped=config.use_flipped)
    normalized = latents_lib.normalize(raw.astype(np.float64), stats, config.sigma_data)
    entry = {"dir": folder, "autoencoder": stats.autoencoder, "latent_shape": list(raw.shape[1:])}
    for kind, values in (("raw", raw), ("normalized", normalized)):
      s = box_stats(values)
      entry[kind] = s
      entry[f"{kind}_per_channel"] = [box_stats(values[..., c]) for c in range(values.shape[-1])]
      panels[kind].append((f"{name}\n{stats.autoencoder[-24:]}", s, _flier_sample(values, s)))
    result["spaces"][name] = entry
    logging.info(
      "%s: normalized outlier rate (outer fences) %.5f",
      name,
      entry["normalized"]["outlier_rate_outer"],
    )
    if name == "latent":
      latent_normalized = normalized
  if config.checkpoint:
    f, step, train_config = denoiser_from_workdir(config.checkpoint, config.checkpoint_step)
    if tuple(train_config.data.latent_shape) != tuple(latent_normalized.shape[1:]):
      raise ValueError(
        f"checkpoint={config.checkpoint!r} trains latents of shape "
        f"{tuple(train_config.data.latent_shape)}, latent_dir holds {latent_normalized.shape[1:]}"
      )
    td = td_statistics(
      f,
      latent_normalized[: config.td_examples],
      config.num_scales,
      jax.random.PRNGKey(config.seed),
    )
    result["td"] = dict(td, checkpoint=config.checkpoint, step=step)
  out = config.output_dir or os.path.join(config.latent_dir, "analysis")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "outliers.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(
    [
      ("raw values", panels["raw"]),
      (f"normalized (x sigma_data={config.sigma_data})", panels["normalized"]),
    ],
    os.path.join(out, "outliers.png"),
  )
  result["output_dir"] = out
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = analyze(_CONFIG.value)
  print(json.dumps({"output_dir": result["output_dir"], "num_examples": result["num_examples"]}))


if __name__ == "__main__":
  job_logging.run(main, "lct_jax.analyze")

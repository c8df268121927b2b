"""Tests of lct_jax.analyze: box statistics, the Karras grid, TD statistics and the Fig. 1 job."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from lct_jax import analyze, config_lib
from lct_jax.core import karras
from lct_jax.core import mesh as mesh_lib
from lct_jax.io import checkpoint, encode_config, encoding, summaries
from lct_jax.io import latents as latents_lib


def test_box_stats_counts_planted_outliers():
  rng = np.random.default_rng(0)
  body = rng.permutation(np.linspace(0.0, 1.0, 1001))  # q1 = .25, median = .5, q3 = .75
  mild = np.array([-0.6, 1.6, 1.7])  # beyond the inner fences (~-0.51, ~1.51), not the outer
  extreme = np.array([-2.0, 3.0, 10.0, 11.0])  # beyond the outer fences (~-1.26, ~2.26)
  s = analyze.box_stats(np.concatenate([body, mild, extreme]))
  v = np.sort(np.concatenate([body, mild, extreme]))
  pos = 0.25 * (v.size - 1)
  q1 = v[int(pos)] + (pos - int(pos)) * (v[int(pos) + 1] - v[int(pos)])
  assert s["q1"] == pytest.approx(q1, abs=1e-12)
  iqr = s["q3"] - s["q1"]
  assert s["inner_fences"] == pytest.approx([s["q1"] - 1.5 * iqr, s["q3"] + 1.5 * iqr])
  assert s["outer_fences"] == pytest.approx([s["q1"] - 3 * iqr, s["q3"] + 3 * iqr])
  assert s["count"] == 1008
  assert (s["outliers_inner_low"], s["outliers_inner_high"]) == (2, 5)
  assert (s["outliers_outer_low"], s["outliers_outer_high"]) == (1, 3)
  assert s["outlier_rate_outer"] == pytest.approx(4 / 1008)
  assert s["whiskers"] == [0.0, 1.0]


def test_box_stats_kurtosis_and_four_sigma_share_against_closed_forms():
  # +-1 with probability 1/2 each: mean 0, std 1, kurtosis 1, nothing beyond 4 sigma.
  s = analyze.box_stats(np.tile([-1.0, 1.0], 500))
  assert s["kurtosis"] == pytest.approx(1.0) and s["beyond_4_sigma"] == 0.0
  # n zeros and two values +-a: mean 0, var 2a^2/(n+2), kurtosis (n+2)/2; |a| > 4 std when
  # (n+2)/2 > 16, i.e. n > 30.
  n, a = 98, 5.0
  v = np.concatenate([np.zeros(n), [-a, a]])
  s = analyze.box_stats(v)
  assert s["kurtosis"] == pytest.approx((n + 2) / 2)
  assert s["beyond_4_sigma"] == pytest.approx(2 / (n + 2))
  g = np.random.default_rng(0).standard_normal(400_000)
  s = analyze.box_stats(g)
  assert s["kurtosis"] == pytest.approx(3.0, abs=0.05)
  assert s["beyond_4_sigma"] == pytest.approx(6.334e-5, abs=4e-5)


def test_karras_sigmas():
  s = analyze.karras_sigmas(21)
  assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002) and len(s) == 21
  i = 7
  expected = (80 ** (1 / 7) + i / 20 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  assert s[i] == pytest.approx(expected, rel=1e-14)
  assert np.all(np.diff(s) < 0)


def test_td_statistics_against_closed_form():
  x = np.random.default_rng(1).normal(size=(10, 4, 4, 2)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  noise = np.asarray(jax.random.normal(key, x.shape, jnp.float32), np.float64)
  sig = analyze.karras_sigmas(5)

  # f(x, s) = x * c(s) with c(s) = 0.25 / (s^2 + 0.25): TD_i = c_i (x + s_i n) - c_j (x + s_j n).
  def c(s):
    return 0.25 / (s**2 + 0.25)

  def denoise(xs, sigma):
    return xs * c(sigma)[:, None, None, None]

  out = analyze.td_statistics(denoise, x, 5, key, batch_size=4)
  assert out["sigmas"] == pytest.approx(sig.tolist(), rel=1e-12)
  x64 = x.astype(np.float64)
  tds = []
  for i in range(4):
    td = c(sig[i]) * (x64 + sig[i] * noise) - c(sig[i + 1]) * (x64 + sig[i + 1] * noise)
    tds.append(td)
    ref = analyze.box_stats(td)
    got = out["per_interval"][i]
    assert got["sigma_i"] == pytest.approx(sig[i]) and got["sigma_next"] == pytest.approx(
      sig[i + 1]
    )
    for k in ("q1", "median", "q3", "mean", "std"):
      assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
  assert out["all"]["count"] == 4 * x.size
  assert out["all"]["median"] == pytest.approx(np.median(np.stack(tds)), rel=1e-4, abs=1e-5)


def test_fig1_job_writes_json_and_plot(tmp_path):
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "img")
  for i in range(6):
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
  dirs = {}
  for name, ae in (("latent", "pixel:2"), ("pixel", "pixel")):
    c = encode_config.get_base_config()
    c.update(
      source="folder",
      path=str(tmp_path / "img"),
      resolution=8,
      autoencoder=ae,
      output_dir=str(tmp_path / name),
      shard_size=4,
      batch_size=8,
      num_workers=1,
    )
    encoding.encode_dataset(c)
    dirs[name] = str(tmp_path / name)
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "fig1", os.path.join(os.path.dirname(__file__), "..", "configs", "analyze", "fig1.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(
    latent_dir=dirs["latent"],
    pixel_dir=dirs["pixel"],
    max_examples=-1,
    output_dir=str(tmp_path / "fig1"),
  )
  analyze.analyze(config)
  with open(tmp_path / "fig1" / "outliers.json") as f:
    doc = json.load(f)
  assert os.path.getsize(tmp_path / "fig1" / "outliers.png") > 1000
  pixels = np.stack([np.asarray(Image.open(tmp_path / "img" / f"{i}.png")) for i in range(6)])
  values = pixels.astype(np.float64) / 127.5 - 1.0  # both spaces hold the same values, rearranged
  ref = analyze.box_stats(values)
  for space in ("latent", "pixel"):
    got = doc["spaces"][space]["raw"]
    for k in ("q1", "median", "q3", "outliers_inner", "count"):
      assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-6), (space, k)
  norm = doc["spaces"]["pixel"]["normalized"]
  z = (values - values.mean(0)) / values.std(0, ddof=1) * 0.5
  assert norm["median"] == pytest.approx(np.median(z), rel=1e-6, abs=1e-9)
  config.checkpoint = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match="config.json"):
    analyze.analyze(config)

  # TD statistics of a (briefly trained) run's EMA params, restored from its checkpoint, equal
  # those of the consistency function built here directly from the same params.
  train_config = test_config.get_config()
  train_config.data.latent_shape = (4, 4, 12)
  train_config.data.autoencoder = "pixel:2"
  trainer = config_lib.build_trainer(train_config, mesh_lib.make_mesh(1))
  state = trainer.init_state(jax.random.PRNGKey(0))
  batch = np.random.default_rng(1).normal(0, 0.5, (16, 4, 4, 12)).astype(np.float32)
  for _ in range(2):
    state, _ = trainer.train_step(state, {"x": batch})
  run = str(tmp_path / "run")
  ckpt = checkpoint.Checkpointer(run, every_steps=1, keep=1, keep_every=0)
  ckpt.save(2, state, None, force=True)
  ckpt.close()
  summaries.write_config(run, train_config)
  config.update(checkpoint=run, num_scales=5, td_examples=4)
  doc = analyze.analyze(config)["td"]
  assert doc["step"] == 2 and len(doc["per_interval"]) == 4
  ema = jax.device_get(state.ema_params)
  noise_cfg = config_lib.noise_config(train_config)

  def f(x, sigma):
    net = lambda a, b: trainer.model.apply({"params": ema}, a, b, train=False)  # noqa: E731
    return karras.consistency_fn(net, x, sigma, noise_cfg)

  stats = latents_lib.load_latent_stats(dirs["latent"])
  raw, _ = analyze.load_values(dirs["latent"], np.arange(4))
  x = latents_lib.normalize(raw.astype(np.float64), stats, 0.5)
  want = analyze.td_statistics(f, x, 5, jax.random.PRNGKey(config.seed))
  for got, ref in zip(doc["per_interval"], want["per_interval"]):
    for k in ("q1", "median", "q3", "std"):
      assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
  assert np.abs(want["all"]["std"]) > 0

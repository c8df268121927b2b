"""Tests of the encode job: shards read back, statistics, resume after a kill, two processes,
broken images, and the compatibility check training runs at start-up."""

import filecmp
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import jax.numpy as jnp
import localhost
import numpy as np
import pytest
import training_helpers as th
from PIL import Image
from tiny_vae import save_tiny_vae

from lct_jax import schema
from lct_jax.io import autoencoder as ae_lib
from lct_jax.io import encode_config, encoding, image_sources, input_pipeline
from lct_jax.io import latent_dataset as ld
from lct_jax.io import latents as latents_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSING = os.path.join(REPO, "tests", "pausing.py")
PAUSE_SHARD = ("lct_jax.io.encoding:_encode_shard", "2")
RES = 16


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("vae"))
  model, params = save_tiny_vae(folder, seed=7)
  return model, params, folder


def _make_images(root, n_square=9, seed=0):
  """RES x RES RGB PNGs in two class folders, a grayscale JPEG, and a wide RGB image."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for i in range(n_square):
    rel = f"{'cat' if i % 2 else 'dog'}/img_{i:02d}.png"
    arr = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    Image.fromarray(arr).save(os.path.join(root, rel))
    arrays[rel] = arr
  gray = rng.integers(0, 256, (RES, RES), dtype=np.uint8)
  Image.fromarray(gray).save(os.path.join(root, "gray.png"))
  arrays["gray.png"] = np.repeat(gray[..., None], 3, axis=-1)
  wide = np.zeros((RES, RES + 8, 3), np.uint8)  # blue margins of 4 px are cropped away
  wide[:, :, 2] = 255
  wide[:, 4:-4] = (200, 10, 30)
  Image.fromarray(wide).save(os.path.join(root, "wide.png"))
  arrays["wide.png"] = np.broadcast_to(np.array([200, 10, 30], np.uint8), (RES, RES, 3))
  return arrays


def _config(path, out, autoencoder, **kw):
  c = encode_config.get_base_config()
  c.source = "folder"
  c.path = str(path)
  c.resolution = RES
  c.autoencoder = autoencoder
  c.output_dir = str(out)
  c.shard_size = 4
  c.batch_size = 8
  c.num_workers = 2
  c.max_bad_fraction = 0.0
  c.update(kw)
  return c


def _read_all(folder):
  import tensorflow_datasets as tfds

  source = tfds.builder_from_directory(str(folder)).as_data_source()["train"]
  return [source[i] for i in range(len(source))]


def _reference_moments(model, params, u8):
  x = jnp.asarray(u8[None].astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)
  dist = model.apply({"params": params}, x, method=model.encode).latent_dist
  return np.asarray(dist.mean[0]), np.asarray(dist.std[0])


def _check_posterior_draws(folder, src):
  """data.latent="fresh": x = normalize(mean + std * eps) with eps ~ N(0, 1), fresh each epoch,
  the same for any process count, normalized with the means' statistics."""
  stats = latents_lib.load_latent_stats(folder, use_flipped=True, latent="fresh")
  kw = dict(global_batch_size=22, seed=3, use_flipped=True)  # one batch per epoch
  post = input_pipeline.make_loader(folder, stats, latent="fresh", **kw)
  plain = input_pipeline.make_loader(folder, stats, latent="mean", **kw)
  halves = [
    input_pipeline.make_loader(
      folder, stats, latent="fresh", process_index=p, process_count=2, **kw
    )
    for p in range(2)
  ]
  moments = src.read_moments(range(len(src)), ("mean", "std"))
  means = moments["mean"].astype(np.float64)
  eff_std = np.maximum(stats.std, stats.std_floor)
  eps = []  # per epoch: (22, H, W, C) draws, rows in example order
  for s in range(2):  # epochs 0 and 1
    np.testing.assert_array_equal(np.concatenate([h[s]["x"] for h in halves]), post[s]["x"])
    x_mean = np.asarray(plain[s]["x"], np.float64)
    x_post = np.asarray(post[s]["x"], np.float64)
    z_mean = x_mean / 0.5 * eff_std + stats.mean
    # Which example each row is (examples with equal means, e.g. a symmetric image and its
    # flipped copy, are interchangeable here).
    ids = ((z_mean[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4)).argmin(axis=1)
    np.testing.assert_allclose(z_mean, means[ids], rtol=0, atol=1e-5)
    z_post = x_post / 0.5 * eff_std + stats.mean
    rows = np.argsort(ids, kind="stable")
    eps.append(((z_post - means[ids]) / moments["std"][ids])[rows])
  draws = np.stack(eps)
  assert abs(draws.mean()) < 0.05 and abs(draws.std() - 1.0) < 0.05  # 5,632 draws
  # Each epoch draws afresh: the two draws of an example are uncorrelated.
  assert abs(np.corrcoef(draws[0].ravel(), draws[1].ravel())[0, 1]) < 0.1


def _check_frozen_draws(examples, folder, src):
  """docs/method.md §9.16: each image's stored sample is ONE posterior draw mean + std * eps, eps ~
  N(0, 1), independent across images and flips; data.latent="sample" (the default) trains on it,
  the same draw every epoch, normalized with the draws' own statistics."""
  eps = []
  for ex in examples:
    for prefix in ("", "flipped_"):
      std = ex[prefix + "std"].astype(np.float64)
      assert std.min() > 0  # the tiny VAE's posterior is not degenerate: the check has teeth
      eps.append((ex[prefix + "sample"] - ex[prefix + "mean"].astype(np.float64)) / std)
  eps = np.stack(eps).reshape(len(eps), -1)  # 22 draws of 256 values
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1.0) < 0.05
  corr = np.corrcoef(eps)[np.triu_indices(len(eps), 1)]
  assert np.abs(corr).max() < 0.3  # no two images (or an image and its flip) share a draw
  stats = latents_lib.load_latent_stats(folder, use_flipped=True, latent="sample")
  samples = np.concatenate(
    [np.stack([ex[k] for ex in examples]) for k in ("sample", "flipped_sample")]
  ).astype(np.float64)
  np.testing.assert_allclose(stats.mean, samples.mean(0), rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(stats.std, samples.std(0, ddof=1), rtol=1e-10, atol=1e-13)
  loader = input_pipeline.make_loader(folder, stats, global_batch_size=22, seed=3, use_flipped=True)
  for s in range(2):  # two epochs, two orders, the same 22 rows
    z = np.asarray(loader[s]["x"], np.float64) / 0.5 * np.maximum(stats.std, stats.std_floor)
    z += stats.mean
    dist = ((z[:, None] - samples[None]) ** 2).sum(axis=(2, 3, 4))
    np.testing.assert_array_equal(np.sort(dist.argmin(axis=1)), np.arange(22))
    np.testing.assert_allclose(dist.min(axis=1), 0, atol=1e-8)


def test_encode_folder_and_read_back(vae, tmp_path):
  model, params, vae_dir = vae
  arrays = _make_images(tmp_path / "img")
  out = tmp_path / "out"
  summary = encoding.encode_dataset(
    _config(tmp_path / "img", out, vae_dir, flip=True, labels_from_subdirs=True)
  )
  assert summary["images_read"] == 11 and summary["dataset"]["shards"] == 3
  examples = _read_all(out)
  ids = [ex["id"].decode() for ex in examples]
  assert ids == sorted(arrays)
  assert [int(ex["index"]) for ex in examples] == list(range(11))
  labels = {i: int(ex["label"]) for i, ex in zip(ids, examples)}
  assert (
    labels["cat/img_01.png"] == 0 and labels["dog/img_00.png"] == 1 and labels["gray.png"] == -1
  )
  for rel, ex in zip(ids, examples):
    assert ex["mean"].shape == (8, 8, 4) and ex["mean"].dtype == np.float32
    ref_mean, ref_std = _reference_moments(model, params, arrays[rel])
    np.testing.assert_allclose(ex["mean"], ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ex["std"], ref_std, rtol=1e-4, atol=1e-5)
    f_mean, f_std = _reference_moments(model, params, arrays[rel][:, ::-1])
    np.testing.assert_allclose(ex["flipped_mean"], f_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ex["flipped_std"], f_std, rtol=1e-4, atol=1e-5)

  # The training-side source: originals, then flipped copies.
  src = ld.LatentMomentsSource(str(out), use_flipped=True)
  assert len(src) == 22
  np.testing.assert_array_equal(src[11 + 3]["mean"], examples[3]["flipped_mean"])
  np.testing.assert_array_equal(src[3]["std"], examples[3]["std"])
  # The training pipeline's batched reader parses the records itself: it must agree with TFDS's
  # decoding of every field it returns, originals and flipped copies alike.
  order = [14, 3, 21, 0, 11, 3]
  got = src.read_moments(order, ("mean", "std", "sample"))
  for row, i in enumerate(order):
    for key in ("mean", "std", "sample"):
      np.testing.assert_array_equal(got[key][row], src[i][key])
  assert set(src.read_moments(order, ("sample",))) == {"sample"}

  _check_frozen_draws(examples, str(out), src)
  _check_posterior_draws(str(out), src)

  means = np.stack([ex["mean"] for ex in examples]).astype(np.float64)
  flips = np.stack([ex["flipped_mean"] for ex in examples]).astype(np.float64)
  with open(out / latents_lib.STATS_FILENAME) as f:
    doc = json.load(f)
  assert doc["autoencoder"] == os.path.abspath(vae_dir) and doc["resolution"] == RES
  assert doc["weights_hash"] == ae_lib.params_hash(params)
  samples = np.stack([ex["sample"] for ex in examples]).astype(np.float64)
  f_samples = np.stack([ex["flipped_sample"] for ex in examples]).astype(np.float64)
  for key, data in (
    ("originals", means),
    ("with_flipped", np.concatenate([means, flips])),
    ("sample_originals", samples),
    ("sample_with_flipped", np.concatenate([samples, f_samples])),
  ):
    block = doc[key]
    assert block["num_latents"] == len(data)
    np.testing.assert_allclose(block["mean"], data.mean(axis=0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(block["std"], data.std(axis=0, ddof=1), rtol=1e-10, atol=1e-13)
    flat = data.reshape(-1, 4)
    np.testing.assert_allclose(block["channel_mean"], flat.mean(axis=0), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(block["channel_std"], flat.std(axis=0, ddof=1), rtol=1e-10)

  # Training's start-up check: the same VAE passes, another VAE or resolution is refused.
  stats = latents_lib.load_latent_stats(str(out))
  latents_lib.check_compatible(stats, autoencoder=vae_dir, resolution=RES, latent_shape=(8, 8, 4))
  with pytest.raises(latents_lib.IncompatibleLatentsError, match="data.autoencoder"):
    latents_lib.check_compatible(stats, autoencoder="stabilityai/sd-vae-ft-ema", resolution=RES)
  with pytest.raises(latents_lib.IncompatibleLatentsError, match="data.resolution"):
    latents_lib.check_compatible(stats, autoencoder=vae_dir, resolution=256)
  # A second run with the same config does nothing; with another config it is refused.
  assert (
    encoding.encode_dataset(
      _config(tmp_path / "img", out, vae_dir, flip=True, labels_from_subdirs=True)
    )["shards_written"]
    == 0
  )
  with pytest.raises(ValueError, match="resolution"):
    encoding.encode_dataset(
      _config(tmp_path / "img", out, vae_dir, flip=True, labels_from_subdirs=True, resolution=8)
    )


def test_normalize_matches_numpy_and_inverts(tmp_path):
  rng = np.random.default_rng(0)
  z = rng.normal(3.0, 2.0, (50, 4, 4, 2))
  acc = latents_lib.MomentAccumulator((4, 4, 2))
  for part in np.array_split(z, [7, 8, 30]):
    acc.update(part)
  stats = latents_lib.LatentStats(
    **acc.finalize(),
    includes_flipped=False,
    autoencoder="pixel",
    weights_hash="h",
    resolution=4,
    scale_factor=1.0,
  )
  latents_lib.save_latent_stats(str(tmp_path), {("mean", False): stats})
  stats = latents_lib.load_latent_stats(str(tmp_path))
  mean, std = z.mean(0), z.std(0, ddof=1)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-13)
  np.testing.assert_allclose(stats.std, std, rtol=1e-12)
  x = latents_lib.normalize(z, stats, sigma_data=0.5)
  np.testing.assert_allclose(x, (z - mean) / std * 0.5, rtol=1e-12)
  np.testing.assert_allclose(latents_lib.denormalize(x, stats, 0.5), z, rtol=1e-12)
  xj = latents_lib.normalize(jnp.asarray(z, jnp.float32), stats)
  assert xj.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(xj), (z - mean) / std * 0.5, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="data.use_flipped"):
    latents_lib.load_latent_stats(str(tmp_path), use_flipped=True)


def test_sources_zip_demo_and_preprocessing(tmp_path):
  arrays = _make_images(tmp_path / "img", n_square=3)
  with zipfile.ZipFile(tmp_path / "img.zip", "w") as zf:
    for rel in arrays:
      zf.write(tmp_path / "img" / rel, rel)
  folder = image_sources.FolderSource(str(tmp_path / "img"), workers=2)
  zipped = image_sources.ZipSource(str(tmp_path / "img.zip"), workers=2)
  assert folder.ids == zipped.ids == sorted(arrays)
  for a, b in zip(folder.read_range(0, len(folder), RES), zipped.read_range(0, len(zipped), RES)):
    np.testing.assert_array_equal(a.image, arrays[a.id])  # crop / grayscale->RGB exact
    np.testing.assert_array_equal(a.image, b.image)
  big = Image.fromarray(np.full((40, 60, 3), 77, np.uint8))
  np.testing.assert_array_equal(image_sources.preprocess(big, RES), 77)  # resize keeps constants
  demo = image_sources.mnist_demo_source()
  assert len(demo) == 5000
  (rec,) = list(demo.read_range(4999, 5000, 32))
  assert rec.id == "mnist/04999" and rec.label == 9 and rec.image.shape == (32, 32, 3)
  assert (rec.image[:2] == 0).all() and (rec.image[..., 0] == rec.image[..., 2]).all()
  assert rec.image.max() > 100


def test_broken_images_skipped_and_reported(vae, tmp_path):
  _make_images(tmp_path / "img")
  good = open(tmp_path / "img" / "gray.png", "rb").read()
  with open(tmp_path / "img" / "truncated.png", "wb") as f:
    f.write(good[: len(good) // 2])
  with open(tmp_path / "img" / "not_an_image.jpg", "w") as f:
    f.write("hello")
  # Both broken files sort into shard 2 of 4 (ids 8-11); the job stops there, before shard 3.
  with pytest.raises(encoding.TooManyBadImagesError, match="2 images .* by shard 2 of 4"):
    encoding.encode_dataset(
      _config(tmp_path / "img", tmp_path / "a", "pixel", max_bad_fraction=0.1)
    )
  assert not ld.is_complete(str(tmp_path / "a"))
  done = [ld.shard_done(str(tmp_path / "a"), s, 4) for s in range(4)]
  assert done == [True, True, True, False]
  encoding.encode_dataset(_config(tmp_path / "img", tmp_path / "b", "pixel", max_bad_fraction=0.2))
  with open(tmp_path / "b" / encoding.REPORT_FILENAME) as f:
    report = json.load(f)
  assert report["images_skipped"] == 2 and report["examples_written"] == 11
  assert sorted(s["id"] for s in report["skipped"]) == ["not_an_image.jpg", "truncated.png"]
  listing = open(tmp_path / "b" / encoding.SKIPPED_FILENAME).read()
  assert "2 of 13" in listing and "truncated.png" in listing
  ids = [ex["id"].decode() for ex in _read_all(tmp_path / "b")]
  assert len(ids) == 11 and "truncated.png" not in ids


def test_images_smaller_than_the_resolution_are_counted_and_warned(tmp_path, monkeypatch):
  _make_images(tmp_path / "img")  # 11 images, none smaller than RES
  Image.fromarray(np.full((1, 1, 3), 7, np.uint8)).save(tmp_path / "img" / "dot.png")
  Image.fromarray(np.zeros((RES - 2, RES + 5, 3), np.uint8)).save(tmp_path / "img" / "low.png")
  warnings = []
  monkeypatch.setattr(encoding.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  encoding.encode_dataset(_config(tmp_path / "img", tmp_path / "out", "pixel"))
  with open(tmp_path / "out" / encoding.REPORT_FILENAME) as f:
    report = json.load(f)
  assert report["images_smaller_than_resolution"] == 2
  assert report["smallest_image"] == {"size": [1, 1], "id": "dot.png"}
  assert report["examples_written"] == 13  # upsampled, not skipped
  (line,) = [w for w in warnings if "smaller than" in w]
  assert line.startswith(f"2 of 13 images are smaller than resolution={RES}") and "dot.png" in line


def _cmd(path, out, autoencoder, *extra, run=(sys.executable, "-m")):
  return [
    *run,
    "lct_jax.encode",
    f"--config={REPO}/configs/encode/folder.py",
    f"--config.path={path}",
    f"--config.output_dir={out}",
    f"--config.autoencoder={autoencoder}",
    f"--config.resolution={RES}",
    "--config.shard_size=2",
    "--config.batch_size=8",
    "--config.num_workers=2",
    "--config.max_bad_fraction=0.0",
    *extra,
  ]


def _shard_files(folder):
  return sorted(n for n in os.listdir(folder) if n.startswith(ld.DATASET_NAME))


def test_killed_job_resumes_to_same_dataset(vae, tmp_path):
  _, _, vae_dir = vae
  _make_images(tmp_path / "img")
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    # A pause after each shard, so that the kill lands between two shards.
    _cmd(tmp_path / "img", killed, vae_dir, run=(sys.executable, PAUSING, *PAUSE_SHARD)),
    env=th.subprocess_env(8),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 120
  while time.time() < deadline and not (killed.is_dir() and _shard_files(killed)):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 1 <= len(_shard_files(killed)) < 6 and not ld.is_complete(str(killed))
  # What a kill during a write leaves: a temporary shard file, never picked up.
  with open(killed / f".tmp-1-{ld.shard_filename(5, 6)}", "wb") as f:
    f.write(b"partial")
  subprocess.run(
    _cmd(tmp_path / "img", killed, vae_dir),
    env=th.subprocess_env(8),
    check=True,
    capture_output=True,
  )
  clean = tmp_path / "clean"
  encoding.encode_dataset(_config(tmp_path / "img", clean, vae_dir, shard_size=2))
  assert _shard_files(killed) == _shard_files(clean) and len(_shard_files(clean)) == 6
  assert not [n for n in os.listdir(killed) if n.startswith(".tmp")]
  for name in _shard_files(clean) + [latents_lib.STATS_FILENAME, "dataset_info.json"]:
    assert filecmp.cmp(killed / name, clean / name, shallow=False), name
  for a, b in zip(_read_all(killed), _read_all(clean)):
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["mean"], b["mean"])


def _last_json_line(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith("{")]
  assert lines, f"no JSON summary line in:\n{stdout[-3000:]}"
  return json.loads(lines[-1])


def _two_processes(images, out, vae_dir, timeout=240):
  """The encode job as two processes of one jax.distributed job; [(returncode, stdout, stderr)]."""
  port = localhost.free_port()
  procs = [
    subprocess.Popen(
      _cmd(
        images,
        out,
        vae_dir,
        "--config.distributed=True",
        f"--config.coordinator_address=127.0.0.1:{port}",
        "--config.num_processes=2",
        f"--config.process_id={i}",
        "--config.cpu_collectives=gloo",
      ),
      env=th.subprocess_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return procs, outputs


def test_two_processes_stop_together_on_too_many_bad_images(vae, tmp_path):
  # The broken image is in shard 1 (ids 2-3), process 1's: it must not stop alone (process 0
  # would wait at the barrier for ever); process 0 reports the total after it.
  _, _, vae_dir = vae
  _make_images(tmp_path / "img")
  (tmp_path / "img" / "cat" / "img_05.png").write_bytes(b"not a png")
  procs, outputs = _two_processes(tmp_path / "img", tmp_path / "multi", vae_dir, timeout=150)
  assert procs[1].returncode == 0, outputs[1][1][-3000:]
  assert procs[0].returncode != 0 and "lct_jax.encode: error: 1 of 11 images" in outputs[0][1]
  assert not ld.is_complete(str(tmp_path / "multi"))


def test_two_processes_encode_disjoint_halves(vae, tmp_path):
  _, _, vae_dir = vae
  _make_images(tmp_path / "img")
  out = tmp_path / "multi"
  procs, outputs = _two_processes(tmp_path / "img", out, vae_dir)
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  # Gloo's C++ side prints its own lines ("[Gloo] Rank 1 is connected ...") to the same stdout,
  # flushed at exit, so the summary is the last line that is a JSON object, not the last line.
  summaries = [_last_json_line(stdout) for stdout, _ in outputs]
  assert [s["shards_written"] for s in summaries] == [3, 3]
  assert sum(s["images_read"] for s in summaries) == 11
  assert "dataset" in summaries[0] and "dataset" not in summaries[1]
  writers = [ld.read_manifest(str(out), s, 6)["process"] for s in range(6)]
  assert writers == [0, 1, 0, 1, 0, 1]
  examples = _read_all(out)
  assert [ex["id"].decode() for ex in examples] == sorted(
    os.path.relpath(os.path.join(d, f), tmp_path / "img")
    for d, _, fs in os.walk(tmp_path / "img")
    for f in fs
  )
  single = tmp_path / "single"
  encoding.encode_dataset(_config(tmp_path / "img", single, vae_dir, shard_size=2))
  for a, b in zip(examples, _read_all(single)):
    assert a["id"] == b["id"]
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-4, atol=2e-5)  # 2 vs 8 devices


def test_listing_leaves_out_hidden_files_follows_symlinks_and_refuses_bad_names(tmp_path):
  root = tmp_path / "img"
  arrays = _make_images(root, n_square=3)
  # macOS archive debris and hidden files: never images of the dataset, never a class.
  for rel in ("__MACOSX/cat/._img_01.png", "cat/._img_01.png", ".thumbs/a.png"):
    os.makedirs(root / os.path.dirname(rel), exist_ok=True)
    (root / rel).write_bytes(b"\x00\x05\x16\x07")
  outside = tmp_path / "elsewhere" / "bird"
  os.makedirs(outside)
  Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(outside / "b.png")
  os.symlink(outside, root / "bird")  # a class folder linked in
  os.symlink(root, root / "cat" / "loop")  # a link back into the tree: listed once
  folder = image_sources.FolderSource(str(root), labels_from_subdirs=True, workers=2)
  want = sorted(list(arrays) + ["bird/b.png"])
  assert folder.ids == want
  assert [folder.labels[folder.ids.index(i)] for i in ("bird/b.png", "cat/img_01.png")] == [0, 1]
  with zipfile.ZipFile(tmp_path / "img.zip", "w") as zf:
    for rel in want + ["__MACOSX/cat/._img_01.png", "cat/._img_01.png"]:
      zf.write(root / rel, rel)
  assert image_sources.ZipSource(str(tmp_path / "img.zip")).ids == want
  # A name that is not UTF-8 cannot be stored as the id: refused at listing, by name.
  with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match=r"caf\\xe9.png.* not valid UTF-8"):
    image_sources.FolderSource(str(root))


def test_16_bit_images_are_scaled_and_32_bit_ones_refused():
  # PIL's convert("RGB") clips 16-bit values at 255 (a near-white image); they are scaled instead.
  v = np.array(
    [0, 1, 128, 129, 257, 32767, 32768, 40000, 50000, 60000, 65021, 65534, 65535, 7, 9, 3]
  )
  buf = io.BytesIO()
  Image.fromarray(v.reshape(4, 4).astype(np.uint16)).save(buf, "PNG")  # a 16-bit grayscale PNG
  img = image_sources._decode(buf.getvalue())
  assert img.mode == "I;16"
  got = image_sources.preprocess(img, resolution=4)
  want = np.round(v.reshape(4, 4).astype(np.float64) * 255 / 65535)
  np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=-1))
  for mode, dtype in (("I", np.int32), ("F", np.float32)):
    with pytest.raises(ValueError, match=f"image mode '{mode}'"):
      image_sources.preprocess(Image.fromarray(v.reshape(4, 4).astype(dtype)), 4)


def test_bad_encode_keys_are_reported_together_each_naming_its_key():
  for key, value in (
    ("resolution", 0),
    ("resolution", -8),
    ("seed", -1),
    ("seed", 2**32),
    ("batch_size", 0),
    ("shard_size", 0),
    ("num_workers", 0),
    ("max_bad_fraction", 1.5),
    ("source", "nope"),
    ("output_dir", ""),
  ):
    c = _config("img", "out", "pixel", **{key: value})
    with pytest.raises(schema.ConfigError, match=rf"^config\.{key}={value!r}: "):
      schema.check_encode(c)
  c = _config("img", "out", "pixel", resolution=0, seed=-1)
  with pytest.raises(schema.ConfigError) as err:
    schema.check_encode(c)
  assert [line.split("=")[0] for line in str(err.value).splitlines()] == [
    "config.resolution",
    "config.seed",
  ]
  schema.check_encode(_config("img", "out", "pixel"))

def test_resume_refuses_a_changed_listing(tmp_path):
  root = tmp_path / "img"
  _make_images(root)  # 11 images, shards of 4
  out = tmp_path / "out"
  encoding.encode_dataset(_config(root, out, "pixel"))
  os.remove(out / "dataset_info.json")  # as if killed before the end: shard 2 missing
  os.remove(out / _shard_files(out)[2])
  os.remove(root / "wide.png")  # same number of images, another one in its place
  Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(root / "aaa.png")
  with pytest.raises(ValueError, match="listing: on disk"):
    encoding.encode_dataset(_config(root, out, "pixel"))
  assert len(_shard_files(out)) == 2 and not ld.is_complete(str(out))


def test_tfds_source_checks_its_feature_keys(tmp_path):
  import tensorflow_datasets as tfds

  class LctTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = dict(
        image=tfds.features.Image(shape=(4, 4, 3)),
        label=tfds.features.ClassLabel(num_classes=3),
        file_name=tfds.features.Text(),
      )
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, dict(image=np.full((4, 4, 3), 40 * i, np.uint8), label=i % 3, file_name=f"f{i}")

  data_dir = str(tmp_path / "tfds")
  LctTinyImages(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )

  def source(image_key="image", label_key="", id_key=""):
    return image_sources.TfdsSource(
      "lct_tiny_images", "train", data_dir, image_key, label_key, id_key, False, workers=1
    )

  recs = list(source(label_key="label", id_key="file_name").read_range(0, 5, 4))
  # (TFDS stores the examples in its own order, the source order.)
  assert sorted((r.id, r.label, int(r.image[0, 0, 0])) for r in recs) == [
    (f"f{i}", i % 3, 40 * i) for i in range(5)
  ]
  recs = list(source().read_range(0, 2, 4))  # unconditional, ids by position
  assert [(r.id, r.label) for r in recs] == [("train/0", -1), ("train/1", -1)]
  for key, bad in (("image_key", "img"), ("label_key", "labels"), ("id_key", "filename")):
    with pytest.raises(ValueError, match=f"no feature '{bad}' \\(config key: {key}\\)"):
      source(**{key: bad})


def test_a_kill_while_writing_the_metadata_leaves_no_finished_mark(tmp_path, monkeypatch):
  _make_images(tmp_path / "img", n_square=2)
  out = tmp_path / "out"
  real = os.replace

  def killed_at_the_mark(src, dst):
    if str(dst).endswith("dataset_info.json"):
      raise KeyboardInterrupt("killed")
    real(src, dst)

  monkeypatch.setattr(os, "replace", killed_at_the_mark)
  with pytest.raises(KeyboardInterrupt):
    encoding.encode_dataset(_config(tmp_path / "img", out, "pixel"))
  assert not ld.is_complete(str(out)) and not (out / "dataset_info.json").exists()
  monkeypatch.setattr(os, "replace", real)
  encoding.encode_dataset(_config(tmp_path / "img", out, "pixel"))  # the rerun finishes it
  assert ld.is_complete(str(out)) and len(_read_all(out)) == 4
  assert not [n for n in os.listdir(out) if n.startswith(".tmp")]

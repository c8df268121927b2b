"""The demo's own path to its score: the training job scores its final checkpoint
(eval.after_training) against a reference it makes from eval.reference_images the first time.

A copy of the demo config, shrunk (64 digits, 3 steps, 4 samples), runs as `python -m
lct_jax.main`. The reference statistics are checked against the Inception features of the same
digits computed here from the image source directly (np.mean / np.cov), and the printed lines
against the result JSONs. The demo config itself (not shrunk) is checked for validity: every key
validates and its reference and data folders are those of its encode config.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import training_helpers as th

from lct_jax import evaluation, schema, scoring
from lct_jax.fid import inception, stats
from lct_jax.io import encode_config, image_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_ENCODE = (
  "from configs.encode import demo\n\n\n"
  "def get_config():\n"
  "  c = demo.get_config()\n"
  "  c.max_examples = {n}\n"
  "  c.resolution = 16\n"
  "  c.shard_size = 64\n"
  "  c.batch_size = 64\n"
  "  return c\n"
)


def _small_run(tmp_path, weights_path, reference_images: int = 12) -> dict:
  train = tmp_path / "encode_train.py"
  train.write_text(SMALL_ENCODE.format(n=64))
  ref = tmp_path / "encode_ref.py"
  ref.write_text(SMALL_ENCODE.format(n=reference_images))
  return {
    "data.dir": str(tmp_path / "latents"),
    "data.encode_config": str(train),
    "data.num_examples": 64,
    "data.latent_shape": (8, 8, 4),
    "model.model_channels": 16,
    "model.channel_mult": (1,),
    "train.total_steps": 3,
    "train.global_batch_size": 16,
    "train.log_every_steps": 1,
    "train.sample_every_steps": 0,
    "eval.num_samples": 4,
    "eval.batch_size": 2,
    "eval.pr_k": 2,
    "eval.grid_samples": 4,
    "eval.reference_images": str(ref),
    "eval.reference_stats": str(tmp_path / "fid" / "ref_stats.npz"),
    "eval.reference_features": str(tmp_path / "fid" / "ref_features.npz"),
    "eval.inception_weights": weights_path,
  }


def _run(workdir, overrides) -> subprocess.CompletedProcess:
  cmd = th.job_command(str(workdir), overrides, th.DEMO_CONFIG)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_demo_config_is_valid_and_scores_itself():
  config = th.load_config({}, th.DEMO_CONFIG)
  schema.check_train(config, 1)
  schema.check_eval(config, 1)
  assert config.eval.after_training and config.eval.num_samples == 1000
  encode = encode_config.load_config_file(config.data.encode_config, "data.encode_config")
  assert config.data.dir == encode.output_dir
  assert config.eval.reference_images == config.data.encode_config  # against its 5,000 digits
  assert schema.total_steps(config) == config.train.total_steps > 0
  assert os.path.dirname(config.eval.reference_stats) == os.path.join(encode_config.DATA_ROOT, "fid")


def test_training_ends_with_the_score_of_its_final_checkpoint(tmp_path, weights_path):
  overrides = _small_run(tmp_path, weights_path)
  work = tmp_path / "work"
  out = _run(work, overrides)
  assert out.returncode == 0, out.stderr[-3000:]
  step_dir = work / "eval" / "step_00000003"
  lines = [line for line in out.stdout.splitlines() if line.startswith("step 3 ")]
  assert len(lines) == 2, out.stdout
  for line, name in zip(lines, ("nfe1", "nfe2_sigma0.821")):
    result = json.loads((step_dir / f"{name}.json").read_text())
    assert line == evaluation.format_result(result)
    assert f"FID {result['fid']:.2f}" in line and result["num_samples"] == 4
    assert result["reference_num_images"] == 12
    assert (step_dir / f"{name}_grid.png").is_file()
  assert "1 NFE" in lines[0] and "2 NFE (sigma_mid 0.821)" in lines[1]

  # The reference: the Inception statistics of the 12 digits as the encode job reads them.
  config = th.load_config(overrides, th.DEMO_CONFIG)
  source, desc, n, res = scoring.reference_source(config)
  images = np.stack([r.image for r in source.read_range(0, n, res)])
  assert images.shape == (12, 16, 16, 3)
  np.testing.assert_array_equal(images[3], image_sources.preprocess(source._image(3), 16))
  feats = inception.batched_features(inception.load_inception(weights_path), images, 4)
  ref = stats.load_stats(overrides["eval.reference_stats"])
  assert ref.meta.num_images == 12 and ref.meta.source == desc
  np.testing.assert_allclose(ref.mu, feats.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.sigma, np.cov(feats.astype(np.float64), rowvar=False), atol=1e-5)
  kept, meta = stats.load_features(overrides["eval.reference_features"])
  np.testing.assert_allclose(kept, feats, rtol=1e-5, atol=1e-6)

  # A rerun trains nothing and scores nothing anew: the same lines, from the same files.
  mtimes = {p: p.stat().st_mtime_ns for p in step_dir.iterdir()}
  ref_mtime = os.stat(overrides["eval.reference_stats"]).st_mtime_ns
  again = _run(work, overrides)
  assert again.returncode == 0, again.stderr[-3000:]
  assert [ln for ln in again.stdout.splitlines() if ln.startswith("step 3 ")] == lines
  assert {p: p.stat().st_mtime_ns for p in step_dir.iterdir()} == mtimes
  assert os.stat(overrides["eval.reference_stats"]).st_mtime_ns == ref_mtime


def test_reference_of_other_images_is_refused_naming_the_file(tmp_path, weights_path):
  overrides = _small_run(tmp_path, weights_path, reference_images=5)
  config = th.load_config(overrides, th.DEMO_CONFIG)
  scoring.ensure_reference(config, weights_path)
  assert stats.load_stats(overrides["eval.reference_stats"]).meta.num_images == 5
  (tmp_path / "encode_ref.py").write_text(SMALL_ENCODE.format(n=6))
  with pytest.raises(stats.IncompatibleStatsError, match="ref_stats.npz holds the reference of"):
    scoring.ensure_reference(config, weights_path)


def test_bad_eval_key_fails_before_training_writes_anything(tmp_path):
  overrides = {"data.dir": str(tmp_path / "latents"), "eval.pr_k": 5000}
  out = _run(tmp_path / "work", overrides)
  assert out.returncode != 0
  assert "config.eval.pr_k=5000" in out.stderr
  assert not (tmp_path / "work").exists() and not (tmp_path / "latents").exists()

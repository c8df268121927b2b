"""`python -m benchmarks.ablation`: rows are the configs they claim, and a killed sweep resumes.

The runner is exercised on the demo base shrunk to 64 digits at 16x16, 3 steps and 4 samples per
run (FIDs of such runs mean nothing; the files and the resume do). A row interrupted after one
step is finished from its checkpoint, and a finished row is not run again.
"""

import json
import os
import subprocess
import sys

import pytest
import training_helpers as th

from benchmarks import ablation as runner
from configs import ablation, demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _components(c):
  return (c.lct.loss, c.lct.diffusion_weight, c.ot.method, c.lct.c_schedule, c.model.final_norm)


@pytest.mark.parametrize("base", ["demo", "fashion_mnist", "celebahq"])
def test_rows_change_only_the_five_components(base):
  full = ablation.BASES[base].get_config()
  rows = {r: ablation.get_config(f"{base},{r}") for r in ablation.ROWS}
  assert _components(rows["nsln"]) == _components(full)  # the last row is the base itself
  chain = [_components(rows[r]) for r in ablation.CHAIN]
  for a, b in zip(chain, chain[1:]):
    assert sum(x != y for x, y in zip(a, b)) == 1
  assert chain[0] == ("pseudo_huber", 0.0, "none", "constant", "group")
  for name in ablation.LOSS_SWAPS:
    assert _components(rows[name]) == (name, *_components(full)[1:])
  for config in rows.values():  # everything else is the base's
    for group in ("data", "train", "optim", "eval"):
      assert config[group].to_dict() == full[group].to_dict()
    assert config.model.model_channels == full.model.model_channels


def test_planned_runs_repeat_the_chains_ends():
  runs = runner.planned_runs(list(ablation.ROWS), extra_seeds=2, seed=0)
  assert len(runs) == 8 + 4 and runs[:8] == [(r, 0) for r in ablation.ROWS]
  assert sorted(runs[8:]) == [("ilct", 1), ("ilct", 2), ("nsln", 1), ("nsln", 2)]


def _tiny(tmp_path, weights_path) -> list[str]:
  encode = tmp_path / "encode_small.py"
  encode.write_text(
    "from configs.encode import demo\n\n\ndef get_config():\n  c = demo.get_config()\n"
    "  c.max_examples, c.resolution, c.shard_size, c.batch_size = 64, 16, 64, 64\n  return c\n"
  )
  values = {
    "data.dir": str(tmp_path / "latents"),
    "data.encode_config": str(encode),
    "data.latent_shape": (8, 8, 4),
    "model.model_channels": 16,
    "model.channel_mult": (1,),
    "train.total_steps": 3,
    "train.global_batch_size": 16,
    "train.sample_every_steps": 0,
    "eval.num_samples": 4,
    "eval.batch_size": 2,
    "eval.pr_k": 2,
    "eval.reference_images": str(encode),
    "eval.reference_stats": str(tmp_path / "ref_stats.npz"),
    "eval.reference_features": str(tmp_path / "ref_features.npz"),
    "eval.inception_weights": weights_path,
  }
  return [f"--config.{k}={th.flag_value(v)}" for k, v in values.items()]


def _sweep(out, rows, overrides):
  cmd = [sys.executable, "-m", "benchmarks.ablation", "--base=demo", f"--out={out}"]
  cmd += [f"--rows={rows}", "--extra_seeds=0", "--", *overrides]
  env = th.subprocess_env()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


def test_sweep_resumes_a_killed_row_and_skips_finished_ones(tmp_path, weights_path):
  overrides, out = _tiny(tmp_path, weights_path), tmp_path / "sweep"
  first = _sweep(out, "ilct", overrides)
  assert "[1/1] ilct seed 0: nfe1 FID" in first
  done = out / "ilct_seed0" / runner.DONE
  stamp = done.stat().st_mtime_ns

  # The nsln row as a killed sweep leaves it: trained one step, a checkpoint, no done marker.
  nsln = out / "nsln_seed0"
  cmd = [sys.executable, "-m", "lct_jax.main", "--config=configs/ablation.py:demo,nsln"]
  cmd += [f"--workdir={nsln}", "--config.seed=0", "--config.train.stop_after_steps=1", *overrides]
  subprocess.run(cmd, cwd=REPO, env=th.subprocess_env(), check=True, capture_output=True)
  assert not (nsln / runner.DONE).exists()

  second = _sweep(out, "ilct,nsln", overrides)
  assert "[1/2] ilct seed 0: done before, skipped" in second
  assert done.stat().st_mtime_ns == stamp
  assert "Resuming from step 1" in (nsln / "log.txt").read_text()
  record = json.loads((nsln / runner.DONE).read_text())
  assert record["resumed"] and record["step"] == 3 and record["row"] == "nsln"
  assert set(record["runs"]) == {"nfe1", "nfe2_sigma0.821"}

  doc = json.loads((out / "ablation.json").read_text())
  assert [e["row"] for e in doc["table"]] == ["ilct", "nsln"]
  ilct = json.loads(done.read_text())
  assert doc["table"][0]["samplers"]["nfe1"]["fid"]["mean"] == ilct["runs"]["nfe1"]["fid"]
  table = (out / "ablation.md").read_text()
  fid = ilct["runs"]["nfe1"]["fid"]
  assert f"| ilct | pseudo_huber | no | none | constant | group | 1 | {fid:.1f} |" in table
  assert (out / "ablation.png").stat().st_size > 1000


def test_demo_is_the_full_recipe():
  # The ablation's last row on the demo base is the demo config: all five components on.
  assert _components(demo.get_config()) == ("cauchy", 5.0, "exact", "adaptive", "nsln")

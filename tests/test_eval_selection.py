"""Checkpoint selection of the eval job (docs/method.md §9.10).

The final checkpoint's FID and the best of the last eval.best_of_last scored checkpoints, from
result JSONs written here (no sampling).
"""

import json
import os

import pytest
import training_helpers as th

from lct_jax import evaluation, schema, scoring
from lct_jax.core import mesh as mesh_lib
from lct_jax.core import sampling
from lct_jax.fid import npz_io

SETTINGS = {k: f"value of {k}" for k in scoring.SETTINGS_KEYS}
RUNS = [sampling.SamplerSpec(), sampling.SamplerSpec((0.821,))]


def _scorer(workdir: str, best_of_last: int) -> scoring.Scorer:
  """A Scorer without networks: enough for the result files and the summary."""
  config = th.load_config({"train.total_steps": 800}, th.DEMO_CONFIG)
  config.eval.best_of_last = best_of_last
  mesh = mesh_lib.make_mesh(1)
  return scoring.Scorer(config, workdir, mesh, None, None, None, None, dict(SETTINGS))


def _write(scorer, step: int, run: sampling.SamplerSpec, **fids) -> None:
  result = dict(SETTINGS, step=step, run=run.name, fid_label="fid10k", **run.fields(), **fids)
  npz_io.save_json_atomic(scorer.result_path(step, run.name), result)


def test_summary_reports_the_final_and_the_best_of_the_last_n(tmp_path):
  scorer = _scorer(str(tmp_path), best_of_last=3)
  nfe1, nfe2 = RUNS
  # nfe1 with both variants at steps 100..600; its PNG FID is lowest at 200 (outside the last 3)
  # and, among 400/500/600, ties at 400 and 500 (the later step wins).
  png = {100: 9.0, 200: 3.0, 300: 8.0, 400: 5.0, 500: 5.0, 600: 6.0}
  jpeg = {100: 19.0, 200: 13.0, 300: 18.0, 400: 16.0, 500: 14.0, 600: 17.0}
  for step in png:
    _write(scorer, step, nfe1, fid=png[step], fid_jpeg_q75=jpeg[step])
  # Stale results are left out: step 700 made with another seed, step 650 without data_latent
  # (both would be the final step and the best).
  _write(scorer, 700, nfe1, fid=1.0, fid_jpeg_q75=1.0)
  path = scorer.result_path(700, nfe1.name)
  with open(path) as f:
    stale = json.load(f)
  npz_io.save_json_atomic(path, dict(stale, seed="another seed"))
  _write(scorer, 650, nfe1, fid=1.0, fid_jpeg_q75=1.0)
  path = scorer.result_path(650, nfe1.name)
  with open(path) as f:
    old = json.load(f)
  del old["data_latent"]
  npz_io.save_json_atomic(path, old)
  # nfe2 (PNG only, as with eval.jpeg=False) at two steps: fewer than N.
  _write(scorer, 300, nfe2, fid=7.0)
  _write(scorer, 600, nfe2, fid=7.5)

  summary = evaluation.write_summary(scorer, RUNS)

  want = {
    "best_of_last": 3,
    "training_final_step": 800,
    "metrics": {
      "nfe1/fid": dict(
        final_step=600, final=6.0, best_step=500, best=5.0, last_steps=[400, 500, 600]
      ),
      "nfe1/fid_jpeg_q75": dict(
        final_step=600, final=17.0, best_step=500, best=14.0, last_steps=[400, 500, 600]
      ),
      "nfe2_sigma0.821/fid": dict(
        final_step=600, final=7.5, best_step=300, best=7.0, last_steps=[300, 600]
      ),
    },
  }
  assert summary == want
  with open(os.path.join(tmp_path, "eval", "summary.json")) as f:
    assert json.load(f) == want
  assert not [p for p in os.listdir(tmp_path / "eval") if p != "summary.json" and "step_" not in p]

  # N = 1: the best of the last one is the final checkpoint.
  one = evaluation.summarize({nfe1.name: scorer.current_results(nfe1.name, nfe1.fields())}, 1)
  assert one["nfe1/fid"] == dict(
    final_step=600, final=6.0, best_step=600, best=6.0, last_steps=[600]
  )


@pytest.mark.parametrize("value", [0, -2])
def test_best_of_last_below_1_is_refused_naming_the_key(value):
  config = th.load_config({}, th.DEMO_CONFIG)
  config.eval.best_of_last = value
  with pytest.raises(schema.ConfigError, match=rf"config\.eval\.best_of_last={value}: "):
    schema.check_eval(config, 1)

"""Each bad input, run through the real binary, ends in one line on stderr that names the problem.

The table holds, per case, the binary, its flags and the words its error line must contain; every
case also checks the exit status, that no traceback reached stderr, and that nothing was written
where the case says so. A tiny run (2 steps, checkpoints 1 and 2) is trained once for the
checkpoint cases, which damage checkpoint 2 in a copy of it three ways (a truncated array file,
orbax's _METADATA removed, a broken data-iterator position); the fallback the line gives (move
the checkpoint aside) is then followed and the run resumes from step 1.
"""

import os
import shutil
import subprocess
import sys

import pytest
import training_helpers as th


REPO = th.REPO
RUN = th.TINY_DEMO_RUN


def _run(module: str, args: list[str], *, cache: str, traceback: bool = False):
  env = th.job_env(cache, 1)
  cmd = [sys.executable, "-m", module, *args] + (["--traceback"] if traceback else [])
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _train_args(workdir: str, data_dir: str, **overrides) -> list[str]:
  flags = dict(RUN, **{"data.dir": data_dir}, **overrides)
  return [f"--config={th.DEMO_CONFIG}", f"--workdir={workdir}"] + [
    f"--config.{k}={th.flag_value(v)}" for k, v in flags.items()
  ]


def _error_lines(proc, prog: str) -> list[str]:
  """The `PROG: error:` lines, after checking that they end stderr and that no traceback shows."""
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
  assert errors and lines[-len(errors) :] == errors, proc.stderr[-3000:]
  return errors


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return th.encode_tiny_demo(str(tmp_path_factory.mktemp("latents")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, cache) -> str:
  workdir = str(tmp_path_factory.mktemp("run") / "work")
  proc = _run("lct_jax.main", _train_args(workdir, data_dir), cache=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  return workdir


def _not_a_file(tmp_path) -> str:
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  return str(path)


# name -> (binary, flags given (tmp_path, data_dir), words the line holds, exit status)
CASES = {
  "misspelled key": (
    "lct_jax.main",
    lambda tmp, data: _train_args(str(tmp / "w"), data) + ["--config.train.totl_steps=5"],
    ["--config.train.totl_steps=5", "no key train.totl_steps", "did you mean train.total_steps"],
    2,
  ),
  "misspelled section": (
    "lct_jax.main",
    lambda tmp, data: _train_args(str(tmp / "w"), data) + ["--config.trian.total_steps=5"],
    ["no key trian.total_steps", "did you mean train.total_steps"],
    2,
  ),
  "no such config file": (
    "lct_jax.main",
    lambda tmp, data: ["--config=configs/nope.py", f"--workdir={tmp / 'w'}"],
    ["--config=configs/nope.py", "no such config file"],
    2,
  ),
  "a value of the wrong type": (
    "lct_jax.main",
    lambda tmp, data: _train_args(str(tmp / "w"), data) + ["--config.train.total_steps=many"],
    ["train.total_steps", "many"],
    2,
  ),
  "workdir is a file": (
    "lct_jax.main",
    lambda tmp, data: _train_args(_not_a_file(tmp), data),
    ["a_file is a file, not a directory"],
    1,
  ),
  "no latent dataset": (
    "lct_jax.main",
    lambda tmp, data: _train_args(str(tmp / "w"), str(tmp / "nothing")),
    ["config.data.dir=", "nothing", "holds no finished latent dataset", "lct_jax.encode"],
    1,
  ),
  "eval: no such checkpoint step": (
    "lct_jax.evaluate",
    lambda tmp, data: _train_args(str(tmp / "w"), data, **{"eval.checkpoint_step": 99}),
    ["config.eval.checkpoint_step=99", "not among the checkpoints [1, 2]"],
    1,
  ),
  "eval: weights file that is no .npz": (
    "lct_jax.evaluate",
    lambda tmp, data: _train_args(
      str(tmp / "w"), data, **{"eval.inception_weights": _not_a_file(tmp)}
    ),
    ["a_file is not a readable .npz archive"],
    1,
  ),
  "encode: unknown source": (
    "lct_jax.encode",
    lambda tmp, data: [
      "--config=configs/encode/demo.py", "--config.source=nope", f"--config.output_dir={tmp / 'o'}"
    ],
    ["config.source='nope'", "unknown value; expected one of folder, zip"],
    1,
  ),
  "encode: bad resolution": (
    "lct_jax.encode",
    lambda tmp, data: [
      "--config=configs/encode/demo.py",
      "--config.resolution=0",
      f"--config.output_dir={tmp / 'o'}",
    ],
    ["config.resolution=0: must be a positive integer"],
    1,
  ),
  "encode: missing image folder": (
    "lct_jax.encode",
    lambda tmp, data: [
      "--config=configs/encode/demo.py",
      "--config.source=folder",
      f"--config.path={tmp / 'no_images'}",
      f"--config.output_dir={tmp / 'o'}",
    ],
    ["no_images", "does not exist", "path"],
    1,
  ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_ends_in_one_line_naming_it(name, tmp_path, data_dir, trained, cache):
  module, args, words, status = CASES[name]
  if module == "lct_jax.evaluate":  # the trained run, copied: the eval job must write nothing
    shutil.copytree(trained, tmp_path / "w")
  before = sorted(os.listdir(tmp_path))
  proc = _run(module, args(tmp_path, data_dir), cache=cache)
  (line,) = _error_lines(proc, module)
  assert proc.returncode == status, proc.stderr[-2000:]
  for word in words:
    assert word in line, line
  if module == "lct_jax.evaluate":
    assert not os.path.exists(tmp_path / "w" / "eval"), os.listdir(tmp_path / "w" / "eval")
  else:  # nothing made: no workdir, no output folder
    made = set(os.listdir(tmp_path)) - set(before) - {"a_file"}
    assert not made, made


def test_every_config_problem_is_reported_at_once(tmp_path, data_dir, cache):
  bad = {
    "lct.s0": 0,
    "optim.learning_rate": -1.0,
    "eval.num_samples": 1,
    "eval.precision_recall": False,
    "eval.after_training": True,  # its eval.* keys are checked before training too
  }
  proc = _run("lct_jax.main", _train_args(str(tmp_path / "w"), data_dir, **bad), cache=cache)
  lines = _error_lines(proc, "lct_jax.main")
  assert len(lines) == 3, lines
  for key, line in zip(("lct.s0=0", "optim.learning_rate=-1.0", "eval.num_samples=1"), lines):
    assert f"config.{key}:" in line, lines
  assert not os.path.exists(tmp_path / "w")


def test_the_traceback_flag_shows_the_traceback(tmp_path, data_dir, cache):
  proc = _run(
    "lct_jax.main", _train_args(str(tmp_path / "w"), data_dir, **{"lct.s0": 0}), cache=cache,
    traceback=True,
  )
  assert proc.returncode != 0
  assert "Traceback (most recent call last)" in proc.stderr
  assert "config.lct.s0=0: must be at least 1" in proc.stderr


def _truncate_largest_array_file(step_dir: str) -> None:
  files = []
  for root, _, names in os.walk(os.path.join(step_dir, "state")):
    files += [os.path.join(root, n) for n in names if os.sep + "d" + os.sep in root + os.sep]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 4)


DAMAGE = {
  "truncated array file": _truncate_largest_array_file,
  "_METADATA removed": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
  "broken data position": lambda d: open(os.path.join(d, "data_position", "metadata"), "w").write(
    "{broken"
  ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_with_the_way_back(
  damage, tmp_path, data_dir, trained, cache
):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "2")
  DAMAGE[damage](step_dir)
  proc = _run("lct_jax.main", _train_args(workdir, data_dir), cache=cache)
  (line,) = _error_lines(proc, "lct_jax.main")
  assert f"checkpoint step 2 in {os.path.join(workdir, 'checkpoints')} cannot be read" in line
  assert "to resume from step 1" in line
  aside = os.path.join(workdir, "corrupt_checkpoint_2")
  assert f"mv {step_dir} {aside}" in line
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]  # nothing lost
  if damage != "truncated array file":
    return
  # The way back: move it aside, rerun the same command; step 2 is trained again from step 1.
  os.rename(step_dir, aside)
  proc = _run("lct_jax.main", _train_args(workdir, data_dir), cache=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from step 1" in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]

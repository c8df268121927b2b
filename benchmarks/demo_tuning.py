"""One tuning run of the demo: train with config overrides, score the final EMA checkpoint, record.

  python -m benchmarks.demo_tuning --label=lr4e-4 -- --config.optim.learning_rate=4e-4

Trains `--config` (default configs/demo.py) with the overrides after `--` in a fresh workdir; the
training job scores its final checkpoint itself (eval.after_training: 1 NFE and 2 NFE,
eval.num_samples samples). Appends one JSON line to --out: the label, the overrides, the wall
time of the whole command (data, training and scoring), the steps/s and the scores.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time


# The settings each line records as the run resolved them (the config file's defaults change).
RESOLVED = [
  ("data", "autoencoder"),
  ("data", "normalization"),
  ("model", "model_channels"),
  ("model", "channel_mult"),
  ("model", "num_blocks"),
  ("lct", "s0"),
  ("lct", "s1"),
  ("lct", "loss"),
  ("lct", "c_schedule"),
  ("optim", "learning_rate"),
  ("optim", "warmup_steps"),
  ("optim", "ema_decay"),
  ("train", "global_batch_size"),
  ("train", "total_steps"),
  ("eval", "num_samples"),
  ("eval", "sigma_mid"),
]


def _run(cmd: list[str], log_path: str) -> float:
  t0 = time.perf_counter()
  with open(log_path, "a") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; log: {log_path}")
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--label", required=True)
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--root", default="/tmp/demo_tuning")
  p.add_argument("--out", default="benchmarks/demo_tuning.jsonl")
  args, overrides = p.parse_known_args()
  overrides = [o for o in overrides if o != "--"]
  workdir = os.path.join(args.root, args.label)
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "log.txt")
  train = [sys.executable, "-m", "lct_jax.main", f"--config={args.config}", f"--workdir={workdir}"]
  wall_s = _run(train + ["--config.eval.after_training=True"] + overrides, log_path)
  results = {}
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "step_*", "*.json"))):
    with open(path) as f:
      r = json.load(f)
    results[r["run"]] = {
      k: r.get(k) for k in ("step", "fid", "precision", "recall", "total_seconds")
    }
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  resolved = {f"{g}.{k}": saved[g][k] for g, k in RESOLVED}
  line = dict(
    label=args.label,
    config=args.config,
    overrides=overrides,
    resolved=resolved,
    wall_s=round(wall_s, 1),
    results=results,
    date=time.strftime("%Y-%m-%d %H:%M"),
  )
  with open(args.out, "a") as f:
    f.write(json.dumps(line) + "\n")
  print(json.dumps(line))


if __name__ == "__main__":
  main()

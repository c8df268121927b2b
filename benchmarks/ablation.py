"""The paper's ablation at small scale, in one command: `python -m benchmarks.ablation`.

  python -m benchmarks.ablation [--base=demo] [--out=workdirs/ablation_demo] [--rows=all]
      [--extra_seeds=2] [-- --config.a.b=v ...]

Trains, on one base config at the base's steps, batch and seed:

* every row of configs/ablation.py: the cumulative chain iLCT -> +Cauchy -> +diffusion loss ->
  +OT -> +adaptive c -> +NsLN, then the pseudo-Huber and Geman-McClure swaps of the full recipe;
* the first and last rows of the chain with `--extra_seeds` more seeds, to show the noise.

Each run is the training binary with eval.after_training, so it ends with the eval job's 1- and
2-NFE FID and precision/recall of its final EMA checkpoint, all against one reference. Overrides
after `--` go to every run.

Each run has its own workdir under --out; `RUN/ablation_run.json` (written last) marks it done. A
rerun after a kill skips the finished runs, and resumes an interrupted one from its last
checkpoint (the training job's own resume) and scores it. At the end, and after every run, it
writes to --out:

* `ablation.json`: every run;
* `ablation.md`: a table per row, mean and spread over seeds;
* `ablation.png`: FID per row.
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from configs import ablation

DONE = "ablation_run.json"
METRICS = ("fid", "precision", "recall")


def planned_runs(rows: list[str], extra_seeds: int, seed: int) -> list[tuple[str, int]]:
  """Every (row, seed): each row at `seed`, then the chain's ends at the extra seeds."""
  runs = [(row, seed) for row in rows]
  for k in range(1, extra_seeds + 1):
    runs += [(row, seed + k) for row in (ablation.CHAIN[0], ablation.CHAIN[-1]) if row in rows]
  return runs


def run_dir(out: str, row: str, seed: int) -> str:
  return os.path.join(out, f"{row}_seed{seed}")


def final_results(workdir: str) -> dict[str, dict]:
  """The eval job's results of the newest scored checkpoint: run name -> result."""
  steps = sorted(glob.glob(os.path.join(workdir, "eval", "step_*")))
  if not steps:
    raise FileNotFoundError(f"no eval results in {workdir}/eval")
  out = {}
  for path in sorted(glob.glob(os.path.join(steps[-1], "*.json"))):
    with open(path) as f:
      result = json.load(f)
    out[result["run"]] = result
  return out


def train_and_score(base: str, row: str, seed: int, workdir: str, overrides: list[str]) -> dict:
  """Runs the training binary for one run (it resumes and scores at its end); returns the record."""
  os.makedirs(workdir, exist_ok=True)
  cmd = [
    sys.executable,
    "-m",
    "lct_jax.main",
    f"--config=configs/ablation.py:{base},{row}",
    f"--workdir={workdir}",
    f"--config.seed={seed}",
    "--config.eval.after_training=True",
    *overrides,
  ]
  resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
  log_path = os.path.join(workdir, "log.txt")
  t0 = time.perf_counter()
  with open(log_path, "a") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
      code = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM here: the run saves a checkpoint and stops
      proc.send_signal(signal.SIGTERM)
      proc.wait()
      raise
  wall = time.perf_counter() - t0
  if code:
    raise RuntimeError(f"{row} seed {seed} failed (exit {code}); see {log_path}")
  results = final_results(workdir)
  record = dict(
    row=row,
    seed=seed,
    base=base,
    overrides=overrides,
    workdir=os.path.abspath(workdir),
    wall_s=round(wall, 1),
    resumed=resumed,
    step=next(iter(results.values()))["step"],
    runs={
      name: {k: r.get(k) for k in (*METRICS, "nfe", "sigma_mid", "num_samples")}
      for name, r in results.items()
    },
    reference=next(iter(results.values())).get("reference_source"),
    date=time.strftime("%Y-%m-%d %H:%M:%S"),
  )
  tmp = os.path.join(workdir, DONE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(workdir, DONE))
  return record


def load_records(out: str, runs: list[tuple[str, int]]) -> list[dict]:
  records = []
  for row, seed in runs:
    path = os.path.join(run_dir(out, row, seed), DONE)
    if os.path.isfile(path):
      with open(path) as f:
        records.append(json.load(f))
  return records


def summarize(records: list[dict], rows: list[str]) -> list[dict]:
  """Per row: the components, and per sampler the mean, spread (min, max) and count over seeds."""
  table = []
  for row in rows:
    mine = [r for r in records if r["row"] == row]
    if not mine:
      continue
    config = ablation.get_config(f"{mine[0]['base']},{row}")
    entry = dict(
      row=row,
      loss=config.lct.loss,
      diffusion=config.lct.diffusion_weight > 0,
      ot=config.ot.method,
      c=config.lct.c_schedule,
      norm=config.model.final_norm,
      seeds=[r["seed"] for r in mine],
      wall_s=float(np.mean([r["wall_s"] for r in mine])),
      samplers={},
    )
    for name in mine[0]["runs"]:
      stats = {}
      for metric in METRICS:
        values = [r["runs"][name][metric] for r in mine if r["runs"][name].get(metric) is not None]
        if values:
          stats[metric] = dict(mean=float(np.mean(values)), min=min(values), max=max(values))
      entry["samplers"][name] = stats
    table.append(entry)
  return table


def _cell(stats: dict, metric: str, digits: int) -> str:
  if metric not in stats:
    return "-"
  s = stats[metric]
  text = f"{s['mean']:.{digits}f}"
  if s["max"] > s["min"]:
    text += f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
  return text


def markdown(table: list[dict]) -> str:
  """The table: one line per row; FID etc. as mean (min-max) over its seeds."""
  samplers = list(table[0]["samplers"]) if table else []
  head = ["row", "loss", "diff", "OT", "c", "norm", "seeds"]
  for name in samplers:
    label = name.replace("nfe1", "1 NFE").replace("nfe2_sigma", "2 NFE s=")
    head += [f"{label} FID", f"{label} prec.", f"{label} rec."]
  head.append("min/run")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in table:
    cells = [e["row"], e["loss"], "yes" if e["diffusion"] else "no", e["ot"], e["c"], e["norm"]]
    cells.append(str(len(e["seeds"])))
    for name in samplers:
      s = e["samplers"].get(name, {})
      cells += [_cell(s, "fid", 1), _cell(s, "precision", 3), _cell(s, "recall", 3)]
    cells.append(f"{e['wall_s'] / 60:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def bar_plot(table: list[dict], path: str, title: str) -> None:
  """FID per row, one bar per sampler; whiskers span the seeds' min to max."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  samplers = list(table[0]["samplers"]) if table else []
  fig, ax = plt.subplots(figsize=(1.3 * max(len(table), 4) + 2, 4.2))
  width = 0.8 / max(len(samplers), 1)
  x = np.arange(len(table))
  for k, name in enumerate(samplers):
    fids = [e["samplers"].get(name, {}).get("fid") for e in table]
    mean = np.array([f["mean"] if f else np.nan for f in fids])
    lo = np.array([f["mean"] - f["min"] if f else 0 for f in fids])
    hi = np.array([f["max"] - f["mean"] if f else 0 for f in fids])
    label = name.replace("nfe1", "1 NFE").replace("nfe2_sigma", "2 NFE, sigma_mid ")
    centres = x + (k - (len(samplers) - 1) / 2) * width
    ax.bar(centres, mean, width, label=label)
    ax.errorbar(centres, mean, yerr=[lo, hi], fmt="none", ecolor="k", capsize=3)
  ax.set_xticks(x, [e["row"] for e in table], rotation=20)
  ax.set_ylabel("FID (lower is better)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(out: str, base: str, runs: list[tuple[str, int]], rows: list[str]) -> list[dict]:
  records = load_records(out, runs)
  table = summarize(records, rows)
  doc = dict(base=base, planned=[list(r) for r in runs], runs=records, table=table)
  with open(os.path.join(out, "ablation.json"), "w") as f:
    json.dump(doc, f, indent=2)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(markdown(table))
  if table:
    bar_plot(table, os.path.join(out, "ablation.png"), f"ablation on {base}")
  return table


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", default="demo", choices=sorted(ablation.BASES))
  p.add_argument("--out", default=None, help="default: workdirs/ablation_<base>")
  p.add_argument("--rows", default="all", help="comma-separated rows of configs/ablation.py")
  p.add_argument("--extra_seeds", type=int, default=2, help="more seeds of the chain's ends")
  p.add_argument("--seed", type=int, default=0)
  args, overrides = p.parse_known_args(argv)
  overrides = [o for o in overrides if o != "--"]
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad}; overrides for the runs look like --config.a.b=v")
  rows = list(ablation.ROWS) if args.rows == "all" else args.rows.split(",")
  unknown = [r for r in rows if r not in ablation.ROWS]
  if unknown:
    p.error(f"unknown rows {unknown}; expected some of {', '.join(ablation.ROWS)}")
  out = args.out or os.path.join("workdirs", f"ablation_{args.base}")
  os.makedirs(out, exist_ok=True)
  runs = planned_runs(rows, args.extra_seeds, args.seed)
  for k, (row, seed) in enumerate(runs, start=1):
    workdir = run_dir(out, row, seed)
    if os.path.isfile(os.path.join(workdir, DONE)):
      print(f"[{k}/{len(runs)}] {row} seed {seed}: done before, skipped", flush=True)
      continue
    print(f"[{k}/{len(runs)}] {row} seed {seed}: training and scoring in {workdir}", flush=True)
    record = train_and_score(args.base, row, seed, workdir, overrides)
    scores = ", ".join(f"{n} FID {r['fid']:.2f}" for n, r in record["runs"].items())
    print(f"[{k}/{len(runs)}] {row} seed {seed}: {scores} ({record['wall_s']:.0f} s)", flush=True)
    write_outputs(out, args.base, runs, rows)
  table = write_outputs(out, args.base, runs, rows)
  sys.stdout.write(markdown(table))
  print(f"written: {os.path.join(out, 'ablation.json')}, ablation.md, ablation.png", flush=True)


if __name__ == "__main__":
  main()

#!/usr/bin/env bash
# The accelerator suite: one call on an H100/H200 box with jax (CUDA), flax, optax and numpy but no
# network. Installs the other wheels from .whl/ (--no-index; fetch them first with
# benchmarks/fetch_wheels.sh: ott-jax, jaxopt, ml_collections, and for the eval benchmark diffusers
# and grain), runs each benchmark, writes the JSON lines to $OUT/results.jsonl and prints a table
# last. No TF, tfds or clu needed.
#   bash benchmarks/gpu_suite.sh            (from the repository root)
set -uo pipefail
OUT=${OUT:-/tmp/lct_gpu_suite}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lct_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/lct_site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
RES="$OUT/results.jsonl"
: >"$RES"
run() { echo "== $*" >&2; timeout "${LCT_BENCH_TIMEOUT:-240}" python3 -m "$@" 2>>"$OUT/stderr.log" | tee -a "$RES"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
# Sizes can be shrunk for a CPU smoke test of the script itself (LCT_SUITE_*).
CFG=${LCT_SUITE_CONFIG:-configs/ffhq.py} B=${LCT_SUITE_BATCH:-128} MM=${LCT_SUITE_MATMUL:-8192}
run benchmarks.matmul_peak --size="$MM" --dtype=bfloat16
run benchmarks.train_step --config="$CFG" --batch_size="$B" --dtype=bfloat16 --steps=10
run benchmarks.train_step --config="$CFG" --batch_size="$B" --dtype=float32 --steps=5
run benchmarks.ot --batch_sizes="$B,$((8 * B))" --methods=exact,sinkhorn --scopes=local,global --repeats=10
# Evaluation: sample (1 NFE) + sd-vae-ft-ema decode (fp32) + FID Inception, extrapolated to 50k.
run benchmarks.eval --config="${LCT_SUITE_EVAL_CONFIG:-configs/ffhq.py}" --batch_size="${LCT_SUITE_EVAL_BATCH:-32}" --num_batches=4
# Global exact OT over 8B rows in the real step (8 microbatches of B), solved on the host one step
# ahead as the training job does, against no OT: the difference is what the coupling costs.
run benchmarks.train_step --config="$CFG" --batch_size=$((8 * B)) --microbatches=8 --dtype=bfloat16 --steps=5 --ot_method=none
run benchmarks.train_step --config="$CFG" --batch_size=$((8 * B)) --microbatches=8 --dtype=bfloat16 --steps=5 --ot_method=exact --ot_scope=global
python3 - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peak = next((r["tflops_per_s"] for r in rows if r["benchmark"] == "matmul_peak"), None)
steps = {r["dtype"]: r for r in rows if r["benchmark"] == "train_step" and r["microbatches"] == 1}
big = {r["ot"]: r for r in rows if r["benchmark"] == "train_step" and r["microbatches"] > 1}
print(f"device: {rows[0]['device_kind'] if rows else '?'}   bf16 matmul peak: {peak and round(peak, 1)} TFLOP/s")
print(f"{'benchmark':<28}{'img/s':>9}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
for r in rows:
  if r["benchmark"] == "train_step":
    mfu = r["tflops_per_s"] / peak if peak and r["tflops_per_s"] else None
    mem = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] else None
    print(f"{'train_step b' + str(r['batch_size']) + ' ' + r['dtype'] + ' ' + r['ot']:<28}{r['img_per_s']:>9.0f}{1e3 * r['median_step_s']:>9.1f}"
          f"{(r['tflops_per_s'] or 0):>9.1f}{(mfu or 0):>7.1%}{(mem or 0):>10.1f}")
bf16 = steps.get("bfloat16")
for r in rows:
  if r["benchmark"] == "ot":
    share = ""
    if bf16:  # an 8x batch on one chip: estimated as 8 steps (stated in the README)
      t = bf16["median_step_s"] * r["batch_size"] / bf16["batch_size"]
      share = f"{r['median_ms'] / 1e3 / t:.2%} of a b{r['batch_size']} step"
    print(f"{'ot ' + r['method'] + '/' + r['scope'] + ' b' + str(r['batch_size']):<28}{r['median_ms']:>9.2f} ms   {share}")
for r in rows:
  if r["benchmark"] == "eval":
    print(f"{'eval 1-NFE b' + str(r['batch_size']) + ' VAE ' + r['vae_dtype']:<28}{r['samples_per_s']:>9.0f} samples/s"
          f"   50,000 samples in {50000 / r['samples_per_s'] / 60:.1f} min (extrapolated)")
if "none/local" in big and "exact/global" in big:
  t0, t1 = big["none/local"]["median_step_s"], big["exact/global"]["median_step_s"]
  print(f"global exact OT in the b{big['none/local']['batch_size']} step, host one step ahead: {1e3 * (t1 - t0):+.1f} ms = {(t1 - t0) / t0:+.2%}")
PY

#!/usr/bin/env bash
# The accelerator suite: one call on an H100/H200 box with jax (CUDA), flax, optax and numpy but no
# network. Installs the other wheels from .whl/ (--no-index), runs each benchmark, writes the JSON
# lines to $OUT/results.jsonl and prints a table last. Core layer only: no TF, tfds, diffusers, clu.
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
python3 - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peak = next((r["tflops_per_s"] for r in rows if r["benchmark"] == "matmul_peak"), None)
steps = {r["dtype"]: r for r in rows if r["benchmark"] == "train_step"}
print(f"device: {rows[0]['device_kind'] if rows else '?'}   bf16 matmul peak: {peak and round(peak, 1)} TFLOP/s")
print(f"{'benchmark':<28}{'img/s':>9}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
for r in rows:
  if r["benchmark"] == "train_step":
    mfu = r["tflops_per_s"] / peak if peak and r["tflops_per_s"] else None
    mem = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] else None
    print(f"{'train_step b' + str(r['batch_size']) + ' ' + r['dtype']:<28}{r['img_per_s']:>9.0f}{1e3 * r['median_step_s']:>9.1f}"
          f"{(r['tflops_per_s'] or 0):>9.1f}{(mfu or 0):>7.1%}{(mem or 0):>10.1f}")
bf16 = steps.get("bfloat16")
for r in rows:
  if r["benchmark"] == "ot":
    share = ""
    if bf16:  # an 8x batch on one chip: estimated as 8 steps (stated in the README)
      t = bf16["median_step_s"] * r["batch_size"] / bf16["batch_size"]
      share = f"{r['median_ms'] / 1e3 / t:.2%} of a b{r['batch_size']} step"
    print(f"{'ot ' + r['method'] + '/' + r['scope'] + ' b' + str(r['batch_size']):<28}{r['median_ms']:>9.2f} ms   {share}")
PY

#!/usr/bin/env bash
# The DiT-B/2 train step beside the paper's UNet step on this machine's CPU, in one run (issue 19):
# the float32 matmul peak first (the MFU denominator), then both steps at the same batch, one JSON
# line each, appended to $OUT (default benchmarks/results_cpu_dit.jsonl).
#   bash benchmarks/cpu_dit_vs_unet.sh            (from the repository root; ~6 min on 2 cores)
set -euo pipefail
OUT=${OUT:-benchmarks/results_cpu_dit.jsonl}
B=${LCT_CPU_BATCH:-4}
PEAK_LINE=$(python -m benchmarks.matmul_peak --size=2048 --dtype=float32 --repeats=10)
echo "$PEAK_LINE" | tee -a "$OUT"
PEAK=$(python -c "import json,sys; print(json.loads(sys.argv[1])['tflops_per_s'])" "$PEAK_LINE")
for CFG in configs/ffhq.py configs/imagenet256_dit.py; do
  python -m benchmarks.train_step --config="$CFG" --batch_size="$B" --dtype=float32 --steps=3 \
    --warmup=1 --peak_tflops="$PEAK" --label=cpu | tee -a "$OUT"
done

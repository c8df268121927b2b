"""Device-time breakdown of a `jax.profiler` trace: `python -m benchmarks.profile_summary TRACE`.

Reads the XSpace file (`*.xplane.pb`, plain or gzipped) with `jax.profiler.ProfileData` (no
TensorFlow or TensorBoard needed). It takes the kernel events of the accelerator planes
(`/device:GPU:N` or `/device:TPU:N`; the host's XLA op events when there are none, as on CPU).
It sums their durations by kind of work (convolution, attention, matrix product, reduction
fusion, elementwise fusion, copy/transpose, other) and by kernel.

Busy time is the union of the kernel intervals, so busy / window says how much of the traced
window the device had work. The rest is launch gaps and host waits.

With the optimized HLO text (`--hlo`, as `train_step.py --dump_dir` keeps it), each kernel is also
attributed to a layer kind of the network through the `op_name` metadata of its HLO instruction:
convolution layers, norms, attention core, SiLU, skip concatenations. Instructions without an
op_name (the optimizer/EMA update fusions and state copies) are counted apart.

Prints one JSON line.

  python -m benchmarks.profile_summary TRACE.xplane.pb[.gz] STEPS [HLO.txt[.gz]]
"""

import collections
import gzip
import json
import re
import sys

# First match wins; tested against the kernel name and XLA's `hlo_op` stat (the HLO instruction).
CATEGORIES = (
  ("attention", re.compile(r"fmha|flash|sdpa|attention|softmax", re.I)),
  (
    "convolution",
    re.compile(r"conv(?!ert)|cudnn|xmma_fprop|dgrad|wgrad|fprop|implicit_gemm", re.I),
  ),
  ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|dot|matmul|wgmma", re.I)),
  ("copy_transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|slice", re.I)),
  ("reduction", re.compile(r"reduce|reduction|input_fusion|row_|column_", re.I)),
  ("elementwise", re.compile(r"fusion|loop_|elementwise|convert|add|multiply", re.I)),
)


# First match wins; tested against the op_name of the kernel's HLO instruction.
LAYERS = (
  ("norms", re.compile(r"/(norm[012]|out_norm)/")),
  ("attention core", re.compile(r"/attn/(?!qkv/|proj/)")),
  ("convolution layers", re.compile(r"conv_general_dilated|/conv[01]/|/skip/|/qkv/|/proj/|_conv/")),
  ("silu", re.compile(r"silu|logistic")),
  ("skip concatenation", re.compile(r"concatenate")),
)
NO_OP_NAME = "optimizer/EMA update, state copies (no op_name)"
OUTSIDE = "step outside the network (loss, optimizer, EMA)"


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its body's lines} of an optimized HLO module's text."""
  return {
    m.group(1): m.group(2).split("\n")
    for m in re.finditer(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S)
  }


def _instructions(hlo_text: str):
  """(name, the rest of its line, the computation it calls or None) of every HLO instruction."""
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M):
    calls = re.search(r"calls=%([\w.\-]+)", m.group(2))
    yield m.group(1), m.group(2), calls.group(1) if calls else None


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its metadata op_name} of an optimized HLO module's text.

  A fusion without metadata of its own (XLA:CPU's ynn fusions) takes the op_name of its body's
  root, else of the body's first instruction that has one.
  """
  body_names = {}
  for name, lines in _computations(hlo_text).items():
    ops = [re.search(r'op_name="([^"]*)"', line) for line in lines]
    root = next(
      (op for line, op in zip(lines, ops) if line.lstrip().startswith("ROOT") and op), None
    )
    first = next((op for op in ops if op), None)
    body_names[name] = (root or first).group(1) if (root or first) else ""
  names = {}
  for name, rest, called in _instructions(hlo_text):
    op = re.search(r'op_name="([^"]*)"', rest)
    names[name] = op.group(1) if op else body_names.get(called, "")
  return names


# The main op of a fusion's body, in this order of precedence, names its kind of work.
FUSION_KINDS = ("convolution", "dot", "reduce", "transpose", "concatenate")
# A CPU thunk event is named by its HLO instruction; the host threads also carry the executor's
# own events (ThunkExecutor::Execute, ThreadpoolListener::..., "end: NAME" markers), which span
# or mark the real ones and are not work of their own.
HLO_INSTRUCTION = re.compile(r"^[A-Za-z_][\w\-]*(\.\d+)?$")


def hlo_fusion_kinds(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: main op of the computation it calls} of an optimized HLO module."""
  bodies = {}
  for name, lines in _computations(hlo_text).items():
    ops = set(re.findall(r"= \S+ ([\w\-]+)\(", "\n".join(lines)))
    bodies[name] = next((k for k in FUSION_KINDS if k in ops), "elementwise")
  return {name: bodies[called] for name, _, called in _instructions(hlo_text) if called in bodies}


def layer_of(op_name: str) -> str:
  if not op_name:
    return NO_OP_NAME
  if "UNet" not in op_name:  # the network's ops carry its module path, e.g. jvp(DhariwalUNet)
    return OUTSIDE
  for layer, pattern in LAYERS:
    if pattern.search(op_name):
      return layer
  return "other: " + op_name.rsplit("/", 1)[-1][:40]


def busy_ns(spans: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end) intervals."""
  busy, end = 0.0, float("-inf")
  for s, e in sorted(spans):
    if e > end:
      busy += e - max(s, end)
      end = e
  return busy


def categorize(name: str, hlo_op: str) -> str:
  for cat, pattern in CATEGORIES:
    if pattern.search(hlo_op) or pattern.search(name):
      return cat
  return "other"


def load(path: str):
  from jax.profiler import ProfileData  # noqa: PLC0415 - only this entry point needs jax

  data = open(path, "rb").read()
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  return ProfileData.from_serialized_xspace(data)


def kernel_events(profile) -> list[tuple[str, str, float, float]]:
  """(name, hlo_op, start_ns, duration_ns) of every device kernel in the trace."""
  planes = [p for p in profile.planes if re.match(r"/device:(GPU|TPU):\d+$", p.name)]
  events = []
  for plane in planes:
    for line in plane.lines:
      if re.search(r"XLA (Modules|Ops|TraceMe)|Steps|Framework|Source", line.name):
        continue  # derived lines repeat the kernels' time
      for ev in line.events:
        stats = dict(ev.stats)
        events.append((ev.name, str(stats.get("hlo_op", "")), ev.start_ns, ev.duration_ns))
  if not events:  # CPU backend: XLA's thunks appear on the host threads, named by HLO op
    for plane in profile.planes:
      if plane.name != "/host:CPU":
        continue
      for line in plane.lines:
        if line.name.startswith("tf_XLA") or "Eigen" in line.name:
          for ev in line.events:
            if HLO_INSTRUCTION.match(ev.name):
              events.append((ev.name, ev.name, ev.start_ns, ev.duration_ns))
  return events


def summarize(path: str, steps: int, top: int = 25, hlo_text: str | None = None) -> dict:
  """The breakdown of a trace of `steps` train steps; times in ms per step.

  `hlo_text`: the optimized HLO of the traced program, for the breakdown by layer kind.
  """
  events = kernel_events(load(path))
  if not events:
    return {"kernels": 0}
  op_names = hlo_op_names(hlo_text) if hlo_text else {}
  fusion_kinds = hlo_fusion_kinds(hlo_text) if hlo_text else {}
  by_cat = collections.Counter()
  by_layer = collections.Counter()
  by_kernel = collections.Counter()
  count = collections.Counter()
  conv_spans = []
  for name, hlo_op, start, dur in events:
    # A kernel named by its instruction (the CPU's thunks; "ynn_fusion.12" says nothing of its
    # work) is categorized by the main op of the computation the instruction calls.
    kind = fusion_kinds.get(hlo_op, "") if name == hlo_op else ""
    cat = categorize(name, f"{hlo_op} {kind}".strip())
    by_cat[cat] += dur
    if cat == "convolution":
      conv_spans.append((start, start + dur))
    if op_names:  # the kernel's instruction: its hlo_op stat, or its name with "_N" for ".N"
      op = op_names.get(hlo_op) or op_names.get(re.sub(r"_(\d+)$", r".\1", name)) or ""
      # XLA:CPU drops the metadata of the weight-gradient convolutions it rewrites.
      by_layer["convolution layers" if kind == "convolution" else layer_of(op)] += dur
    key = f"{hlo_op or '-'} | {name[:90]}"
    by_kernel[key] += dur
    count[key] += 1
  spans = [(s, s + d) for _, _, s, d in events]
  busy = busy_ns(spans)
  window = max(e for _, e in spans) - min(s for s, _ in spans)
  per_step = 1e-6 / steps
  total = sum(by_cat.values())
  summary = {
    "kernels": len(events),
    "kernel_ms_per_step": total * per_step,
    "busy_ms_per_step": busy * per_step,
    "window_ms_per_step": window * per_step,
    "busy_fraction": busy / window if window else None,
    # Time some kernel but no convolution ran: what faster convolutions cannot remove. (On the
    # CPU, kernel time exceeds busy time: the host's threads run kernels side by side.)
    "busy_ms_per_step_without_convolution": (busy - busy_ns(conv_spans)) * per_step,
    "ms_per_step_by_category": {k: round(v * per_step, 3) for k, v in by_cat.most_common()},
    "top_kernels": [
      {"kernel": k, "calls_per_step": count[k] / steps, "ms_per_step": round(v * per_step, 3)}
      for k, v in by_kernel.most_common(top)
    ],
  }
  if by_layer:
    summary["ms_per_step_by_layer"] = {
      k: round(v * per_step, 3) for k, v in by_layer.most_common(12)
    }
  return summary


def main(argv):
  steps = int(argv[2]) if len(argv) > 2 else 1
  hlo = None
  if len(argv) > 3:
    with (gzip.open if argv[3].endswith(".gz") else open)(argv[3], "rt") as f:
      hlo = f.read()
  row = {"benchmark": "profile", "trace": argv[1], **summarize(argv[1], steps, hlo_text=hlo)}
  sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main(sys.argv)

"""benchmarks/profile_summary.py: interval union, layer attribution, and a real CPU trace."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile_summary as ps


def test_busy_time_is_the_union_of_the_intervals():
  rng = np.random.default_rng(0)
  for _ in range(20):
    starts = rng.integers(0, 200, size=30)
    spans = [(float(s), float(s + rng.integers(0, 25))) for s in starts]
    covered = np.zeros(260, bool)  # unit cells [t, t + 1) covered by some interval
    for s, e in spans:
      covered[int(s) : int(e)] = True
    assert ps.busy_ns(spans) == covered.sum()


def test_layer_attribution_from_op_names():
  hlo = "\n".join(
    [
      '  %fusion.1 = bf16[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(step_fn)/jvp('
      'DhariwalUNet)/enc_16x16_block0/norm1/reduce_sum" stack_frame_id=3}',
      '  %custom-call.2 = bf16[8]{0} custom-call(%a), metadata={op_name="jit(step_fn)/transpose('
      'jvp(DhariwalUNet))/dec_8x8_block1/attn/qkv/conv_general_dilated"}',
      '  ROOT %fusion.3 = f32[8]{0} fusion(%b), metadata={op_name="jit(step_fn)/jvp(DhariwalUNet'
      ')/enc_16x16_block0/attn/dot_general"}',
      "  %input_transpose_fusion.4 = (f32[3,3]{1,0}) fusion(%c), kind=kInput",
      '  %divide_fusion.5 = f32[8]{0} fusion(%d), metadata={op_name="jit(step_fn)/div"}',
      "  %ynn_fusion.6 = f32[8]{0} fusion(%e), kind=kCustom, calls=%fused_computation.6",
      "}",
      "%fused_computation.6 (param_0: f32[8]) -> f32[8] {",
      '  %n = f32[8]{0} negate(%param_0), metadata={op_name="jit(step_fn)/jvp(DhariwalUNet)/x"}',
      '  ROOT %c.1 = f32[8]{0} convolution(%n, %n), metadata={op_name="jit(step_fn)/jvp(Dhariwa'
      'lUNet)/dec_8x8_block1/conv0/conv_general_dilated"}',
      "}",
    ]
  )
  names = ps.hlo_op_names(hlo)
  assert set(names) == {
    "fusion.1",
    "custom-call.2",
    "fusion.3",
    "input_transpose_fusion.4",
    "divide_fusion.5",
    "ynn_fusion.6",
    "n",
    "c.1",
  }
  assert ps.layer_of(names["fusion.1"]) == "norms"
  assert ps.layer_of(names["custom-call.2"]) == "convolution layers"  # attn/qkv is a 1x1 conv
  assert ps.layer_of(names["fusion.3"]) == "attention core"
  assert ps.layer_of(names["input_transpose_fusion.4"]) == ps.NO_OP_NAME
  assert ps.layer_of(names["divide_fusion.5"]) == ps.OUTSIDE
  # A fusion without metadata (XLA:CPU's ynn fusions) is named by its body's root.
  assert ps.layer_of(names["ynn_fusion.6"]) == "convolution layers"


def test_summary_of_a_real_cpu_trace(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((128, 128))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(a).block_until_ready()
  (path,) = glob.glob(os.path.join(tmp_path, "**", "*.xplane.pb"), recursive=True)
  summary = ps.summarize(path, steps=2)
  assert summary["kernels"] > 0
  assert 0 < summary["busy_ms_per_step"] <= summary["window_ms_per_step"]
  assert (
    abs(sum(summary["ms_per_step_by_category"].values()) - summary["kernel_ms_per_step"]) < 1e-2
  )


def test_fusion_kind_is_the_main_op_of_the_called_body():
  hlo = "\n".join(
    [
      "%fused_computation.1 (param_0: f32[8,4,4,2], param_1: f32[3,3,2,2]) -> f32[8,4,4,2] {",
      "  %param_0 = f32[8,4,4,2]{3,2,1,0} parameter(0)",
      "  %t = f32[8,4,4,2]{3,2,1,0} transpose(%param_0), dimensions={0,1,2,3}",
      "  ROOT %c = f32[8,4,4,2]{3,2,1,0} convolution(%t, %param_1), dim_labels=b01f_01io->b01f",
      "}",
      "%fused_computation.2 (param_0.1: f32[8]) -> f32[] {",
      "  %e = f32[8]{0} convert(%param_0.1)",
      "  ROOT %r = f32[] reduce(%e, %z), dimensions={0}, to_apply=%add",
      "}",
      "%fused_computation.3 (param_0.2: f32[8]) -> f32[8] {",
      "  ROOT %m = f32[8]{0} multiply(%param_0.2, %param_0.2)",
      "}",
      "ENTRY %main {",
      "  %ynn_fusion.7 = f32[8,4,4,2]{3,2,1,0} fusion(%a, %b), kind=kCustom, "
      "calls=%fused_computation.1",
      "  %convert_reduce_fusion = f32[] fusion(%c), kind=kLoop, calls=%fused_computation.2",
      "  ROOT %wrapped_multiply = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_computation.3",
      "}",
    ]
  )
  kinds = ps.hlo_fusion_kinds(hlo)
  assert kinds == {
    "ynn_fusion.7": "convolution",
    "convert_reduce_fusion": "reduce",
    "wrapped_multiply": "elementwise",
  }
  assert ps.categorize("convert_reduce_fusion", "convert_reduce_fusion reduce") == "reduction"
  assert ps.categorize("wrapped_convert", "wrapped_convert elementwise") == "elementwise"


def test_cpu_trace_counts_only_xla_ops_and_sees_the_convolution(tmp_path):
  def f(x, w):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(y).sum()

  x, w = jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32)) / 288
  jitted = jax.jit(f)
  hlo = jitted.lower(x, w).compile().as_text()
  jitted(x, w).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      jitted(x, w).block_until_ready()
  (path,) = glob.glob(os.path.join(tmp_path, "**", "*.xplane.pb"), recursive=True)
  summary = ps.summarize(path, steps=2, hlo_text=hlo)
  instructions = ps.hlo_op_names(hlo)
  for row in summary["top_kernels"]:  # the executor's own spans and markers are not kernels
    assert row["kernel"].split(" | ")[0] in instructions, row
  assert summary["ms_per_step_by_category"].get("convolution", 0) > 0
  assert 0 <= summary["busy_ms_per_step_without_convolution"] < summary["busy_ms_per_step"]

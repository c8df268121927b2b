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
    ]
  )
  names = ps.hlo_op_names(hlo)
  assert set(names) == {"fusion.1", "custom-call.2", "fusion.3", "input_transpose_fusion.4"}
  assert ps.layer_of(names["fusion.1"]) == "norms"
  assert ps.layer_of(names["custom-call.2"]) == "convolution layers"  # attn/qkv is a 1x1 conv
  assert ps.layer_of(names["fusion.3"]) == "attention core"
  assert ps.layer_of(names["input_transpose_fusion.4"]) == ps.NO_OP_NAME


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

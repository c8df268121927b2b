"""benchmarks/conv_forms.py: its Winograd convolutions and reference are right, and it finds the
paper network's 3x3 layers (so its timings compare like with like)."""

import numpy as np
import pytest

from benchmarks import conv_forms


def _brute_force(x, w):
  """'same' 3x3 correlation, one output element at a time, float64."""
  b, h, wd, _ = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.zeros((b, h, wd, w.shape[-1]))
  for n in range(b):
    for i in range(h):
      for j in range(wd):
        y[n, i, j] = np.einsum("abc,abco->o", xp[n, i : i + 3, j : j + 3], w)
  return y


@pytest.mark.parametrize("shape", [(2, 8, 8, 3, 5), (1, 5, 7, 4, 2)])  # even, and ragged tiles
def test_winograd_and_reference_convolutions(shape):
  b, h, wd, c, o = shape
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, h, wd, c)).astype(np.float32)
  w = rng.standard_normal((3, 3, c, o)).astype(np.float32)
  ref = _brute_force(x, w)
  np.testing.assert_allclose(conv_forms.numpy_conv(x, w), ref, rtol=1e-12, atol=1e-12)
  scale = np.abs(ref).max()
  for m, tol in ((2, 1e-5), (4, 1e-4)):
    got = np.asarray(conv_forms.winograd_conv(x, w, m), np.float64)
    np.testing.assert_allclose(got, ref, atol=tol * scale, err_msg=f"F({m}x{m}, 3x3)")
  np.testing.assert_allclose(conv_forms.xla_conv(x, w), ref, atol=1e-5 * scale)


def test_paper_network_has_90_convolutions_of_3x3():
  # DhariwalUNet (channel_mult 1, 2, 3, 4; 4 blocks): encoder stem 1 + 4 levels x 4 blocks x 2 +
  # 3 down blocks x 2 = 39; decoder 2 blocks x 2 at 4x4 + 4 levels x 5 blocks x 2 + 3 up blocks
  # x 2 = 50; output conv 1.
  shapes = conv_forms.paper_conv_shapes(8)
  assert sum(shapes.values()) == 90
  assert shapes[(8, 32, 32, 4, 128)] == 1 and shapes[(8, 32, 32, 128, 4)] == 1
  assert {s[1] for s in shapes} == {32, 16, 8, 4} and {s[0] for s in shapes} == {8}

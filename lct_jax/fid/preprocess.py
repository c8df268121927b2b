"""pytorch-fid's input pipeline in JAX: uint8 NHWC RGB -> float32 299x299 in [-1, 1].

The steps:

1. `x / 255` (IEEE division, like torchvision's ToTensor);
2. a bilinear resize to 299x299 equal to `torch.nn.functional.interpolate(mode="bilinear",
   align_corners=False)` without antialiasing. It uses the same taps and float32 weights as ATen;
   under jit on XLA:CPU the output is bit-identical to torch's CPU kernel, elsewhere within a few
   ulp;
3. `2x - 1`.
"""

import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
# Recorded with every statistics file; two files are comparable only if these strings are equal.
PREPROCESSING = (
  "uint8 RGB /255 -> bilinear resize to 299x299 (torch interpolate, align_corners=False, "
  "no antialias) -> 2x-1"
)


def _torch_linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
  """Source indices and weights of torch's 1-D linear resampling (align_corners=False).

  Mirrors ATen's float32 arithmetic: scale = in/out, src = scale * (dst + 0.5) - 0.5 clamped at 0,
  i0 = floor(src), i1 = i0 + 1 except at the last pixel, w1 = src - i0, w0 = 1 - w1. ATen's
  kernels (CPU builds with FMA, and CUDA) evaluate src as one fused multiply-add, rounding once;
  the float64 evaluation below is exact before its single rounding to float32, so it gives the
  same bits (checked against torch: every weight equal).

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    (i0, i1, w0, w1): int32 and float32 arrays of length out_size.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32) + f32(0.5)
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)
  src = np.where(src < 0, f32(0), src).astype(f32)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
  i1 = i0 + (i0 < in_size - 1).astype(np.int64)
  return i0.astype(np.int32), i1.astype(np.int32), (f32(1) - lam).astype(f32), lam


def resize_bilinear_torch(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC floats, equal to torch's `interpolate(bilinear, align_corners=False)`.

  Interpolates along W first, then H, as ATen's separable CPU kernel does.

  Args:
    x: float array (B, H, W, C).
    out_hw: (height, width) of the output.

  Returns:
    float array (B, out_h, out_w, C) of x's dtype.
  """
  _, h, w, _ = x.shape
  out_h, out_w = out_hw
  if (h, w) == (out_h, out_w):
    return x  # torch's taps are the identity here: i0 = dst, weight 1 and 0.
  hi0, hi1, hw0, hw1 = _torch_linear_taps(h, out_h)
  wi0, wi1, ww0, ww1 = _torch_linear_taps(w, out_w)
  ww0 = jnp.asarray(ww0, x.dtype)[None, None, :, None]
  ww1 = jnp.asarray(ww1, x.dtype)[None, None, :, None]
  hw0 = jnp.asarray(hw0, x.dtype)[None, :, None, None]
  hw1 = jnp.asarray(hw1, x.dtype)[None, :, None, None]

  def along_w(rows: jax.Array) -> jax.Array:
    return rows[:, :, wi0] * ww0 + rows[:, :, wi1] * ww1

  return along_w(x[:, hi0]) * hw0 + along_w(x[:, hi1]) * hw1


_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def preprocess(images: jax.Array) -> jax.Array:
  """pytorch-fid's input pipeline: uint8 NHWC RGB -> float32 (B, 299, 299, 3) in [-1, 1].

  Args:
    images: uint8 array (B, H, W, 3), any H and W.

  Returns:
    float32 array (B, 299, 299, 3).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images (B, H, W, 3), got shape {images.shape}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype} (map to [0, 255] uint8 first)")
  # x / 255 as IEEE division (like torch's ToTensor): XLA would turn a division by a constant
  # into a multiplication by its reciprocal, off by one ulp for half of the 256 values.
  x = jnp.asarray(_UINT8_TO_UNIT)[images.astype(jnp.int32)]
  x = resize_bilinear_torch(x, (INPUT_SIZE, INPUT_SIZE))
  return 2.0 * x - 1.0

"""DiT, the Diffusion Transformer (Peebles & Xie 2022, arXiv 2212.09748), in Flax Linen.

This module owns the adaLN-Zero DiT, written from the paper's definitions, with the call
signature of `lct_jax.core.models.unet.DhariwalUNet` plus optional class labels:

* patch embedding: a p x p convolution with stride p (C -> D, with bias), giving a token grid
  (B, H/p, W/p, D);
* a fixed 2-D sin-cos position embedding (`pos_embed_2d`, a constant, not a parameter);
* conditioning c = MLP(sinusoid(c_noise)) (+ a class embedding when `num_classes > 0`);
* `depth` adaLN-Zero transformer blocks (`DiTBlock`);
* the adaLN final layer (`FinalLayer`) and unpatchify back to (B, H, W, C_out).

Layouts (needed to port weights or to write a reference):

* tokens are kept as a grid (B, h, w, D), h = H/p; flattened, the order is row-major (h, w),
  as in DiT;
* the qkv Linear's 3D output channels are laid out (head, channel-in-head, {q, k, v}), the
  layout of `layers.attention_op` (EDM's): channel n * 3 * (D / heads) + 3 * j + s is part s
  (0 q, 1 k, 2 v) of channel j of head n. The original DiT (timm `Attention`) orders them
  ({q, k, v}, head, channel-in-head) instead, so its qkv weight ports by permuting columns;
* each token's p * p * C_out outputs are laid out (p_row, p_col, C): output channel
  (i * p + j) * C_out + c of token (r, s) is pixel (r * p + i, s * p + j), channel c.

Kernels are (in, out) (Dense) and HWIO (patch conv). Parameters are always float32; `dtype` is
the computation dtype of the dense layers, the patch convolution and attention. LayerNorm, the
modulation and the residual stream are float32 (as under torch autocast); the output is float32.
"""

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lct_jax.core.models.layers import LabelEmbedding, attention_op, positional_embedding

Dtype = Any

# (hidden_size, depth, num_heads) of the DiT paper's Table 1.
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)
NOISE_EMBED_CHANNELS = 256
LN_EPSILON = 1e-6

_NAME_RE = re.compile(r"(?:DiT-)?(?P<size>[A-Z]+)/(?P<patch>\d+)")
# A size of one's own: hidden x depth x heads / patch, e.g. "128x4x4/2" (small runs, tests).
_CUSTOM_RE = re.compile(r"(?P<hidden>\d+)x(?P<depth>\d+)x(?P<heads>\d+)/(?P<patch>\d+)")


def dit_size(name: str) -> dict:
  """Parses a DiT configuration name into `DiT` keyword arguments.

  Args:
    name: "DiT-<size>/<patch>" or "<size>/<patch>", size in DIT_SIZES and patch in PATCH_SIZES
      (the paper's models); or "<hidden>x<depth>x<heads>/<patch>" for a size of one's own, with
      hidden divisible by heads and by 4 (the 2-D position embedding).

  Returns:
    dict(hidden_size=..., depth=..., num_heads=..., patch_size=...).
  """
  text = name.strip() if isinstance(name, str) else ""
  custom = _CUSTOM_RE.fullmatch(text)
  if custom is not None:
    hidden, depth, heads, patch = (int(custom[k]) for k in ("hidden", "depth", "heads", "patch"))
    if min(hidden, depth, heads, patch) < 1 or hidden % heads or hidden % 4:
      raise ValueError(
        f"DiT size {name!r}: hidden, depth, heads and patch must be positive, hidden divisible "
        "by heads and by 4"
      )
    return dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
  m = _NAME_RE.fullmatch(text)
  if m is None or m["size"] not in DIT_SIZES or int(m["patch"]) not in PATCH_SIZES:
    allowed = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES)
    raise ValueError(
      f"unknown DiT name {name!r}; expected one of {allowed} (or without 'DiT-'), or "
      "HIDDENxDEPTHxHEADS/PATCH such as 128x4x4/2"
    )
  hidden, depth, heads = DIT_SIZES[m["size"]]
  return dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(m["patch"]))


def sincos_1d(pos: np.ndarray, dim: int) -> np.ndarray:
  """The 1-D sin-cos embedding of MAE/DiT: [sin(pos * omega), cos(pos * omega)].

  omega_k = 1 / 10000^(k / (dim / 2)), k = 0..dim/2-1.

  Args:
    pos: (N,) positions.
    dim: embedding width, even.

  Returns:
    (N, dim) float64, sines first.
  """
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  arg = np.asarray(pos, np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)


def pos_embed_2d(grid_size: int, dim: int) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding of a square token grid.

  Channels [0, dim/2) are `sincos_1d` of the column index (grid w) and [dim/2, dim) that of
  the row index (grid h), the assignment of MAE/DiT (whose `meshgrid(grid_w, grid_h)` puts w
  first).

  Args:
    grid_size: h == w of the token grid.
    dim: embedding width, divisible by 4.

  Returns:
    (grid_size, grid_size, dim) float32 constant, indexed [row, col].
  """
  if dim % 4:
    raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
  idx = np.arange(grid_size)
  rows, cols = np.meshgrid(idx, idx, indexing="ij")
  emb_col = sincos_1d(cols.reshape(-1), dim // 2)
  emb_row = sincos_1d(rows.reshape(-1), dim // 2)
  emb = np.concatenate([emb_col, emb_row], axis=1)
  return emb.reshape(grid_size, grid_size, dim).astype(np.float32)


def layer_norm(x: jax.Array, epsilon: float = LN_EPSILON) -> jax.Array:
  """LayerNorm over the last axis without affine, in float32 (biased variance, two-pass).

  Args:
    x: (..., D).
    epsilon: added to the variance.

  Returns:
    float32, the shape of x.
  """
  x = x.astype(jnp.float32)
  d = x - x.mean(axis=-1, keepdims=True)
  return d * jax.lax.rsqrt(jnp.square(d).mean(axis=-1, keepdims=True) + epsilon)


def modulate(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation h * (1 + scale) + shift, in float32.

  Args:
    h: (B, h, w, D) normalised tokens.
    shift: (B, D).
    scale: (B, D).

  Returns:
    (B, h, w, D) float32.
  """
  shift = shift.astype(jnp.float32)[:, None, None, :]
  scale = scale.astype(jnp.float32)[:, None, None, :]
  return h.astype(jnp.float32) * (1.0 + scale) + shift


def _flat_xavier_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
  """Xavier-uniform of a conv kernel (..., in, out) as if it were a (prod(...) * in, out) Linear."""
  flat = (math.prod(shape[:-1]), shape[-1])
  return nn.initializers.xavier_uniform()(key, flat, dtype).reshape(shape)


def _dense(features: int, dtype: Dtype, name: str, zero: bool = False) -> nn.Dense:
  """A Dense layer with DiT's init: xavier-uniform kernel (or zero), zero bias; float32 params."""
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=init,
    bias_init=nn.initializers.zeros,
    name=name,
  )


class DiTBlock(nn.Module):
  """One adaLN-Zero DiT block.

  (shift, scale, gate) x {msa, mlp} = adaLN_modulation(SiLU(c)), split in that order;
  x = x + gate_msa * attn(modulate(LN(x), shift_msa, scale_msa));
  x = x + gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp)).
  attn: qkv Linear D -> 3D (layout (head, channel-in-head, {q, k, v})), softmax attention over
  all tokens, proj Linear D -> D. mlp: fc1 D -> mlp_ratio * D, GELU (tanh), fc2 back to D.
  adaLN_modulation is zero-initialised, so a fresh block is the identity.
  Submodules: `adaLN_modulation`, `qkv`, `proj`, `fc1`, `fc2`.
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Apply the block.

    Args:
      x: (B, h, w, D) token grid.
      c: (B, D) conditioning (before SiLU).

    Returns:
      (B, h, w, D) float32.
    """
    d = self.hidden_size
    x = x.astype(jnp.float32)
    mod = _dense(6 * d, self.dtype, "adaLN_modulation", zero=True)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    h = modulate(layer_norm(x), shift_msa, scale_msa)
    qkv = _dense(3 * d, self.dtype, "qkv")(h)
    h = attention_op(qkv, self.num_heads, self.attention_impl)
    h = _dense(d, self.dtype, "proj")(h)
    x = x + gate_msa.astype(jnp.float32)[:, None, None, :] * h.astype(jnp.float32)

    h = modulate(layer_norm(x), shift_mlp, scale_mlp)
    h = nn.gelu(_dense(int(d * self.mlp_ratio), self.dtype, "fc1")(h), approximate=True)
    h = _dense(d, self.dtype, "fc2")(h)
    return x + gate_mlp.astype(jnp.float32)[:, None, None, :] * h.astype(jnp.float32)


class FinalLayer(nn.Module):
  """DiT's final layer: linear(modulate(LN(x), shift, scale)), (shift, scale) = adaLN(SiLU(c)).

  Both Linears (`adaLN_modulation` D -> 2D, `linear` D -> p * p * C_out) are zero-initialised.
  """

  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Args: x (B, h, w, D), c (B, D). Returns: (B, h, w, p * p * C_out) in `dtype`."""
    mod = _dense(2 * self.hidden_size, self.dtype, "adaLN_modulation", zero=True)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = modulate(layer_norm(x), shift, scale)
    p = self.patch_size
    return _dense(p * p * self.out_channels, self.dtype, "linear", zero=True)(h)


def unpatchify(tokens: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """(B, h, w, p * p * C) tokens, each laid out (p_row, p_col, C), to a (B, h p, w p, C) image.

  Args:
    tokens: (B, h, w, p * p * C).
    patch_size: p.
    channels: C.

  Returns:
    (B, h * p, w * p, C), dtype of tokens.
  """
  b, gh, gw, _ = tokens.shape
  p = patch_size
  t = tokens.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return t.reshape(b, gh * p, gw * p, channels)


class DiT(nn.Module):
  """DiT with adaLN-Zero blocks: NHWC in, NHWC out.

  Attributes:
    input_size: H == W of the (latent) input.
    in_channels: input channels.
    out_channels: output channels (the original DiT learns sigma with 2 * in_channels).
    patch_size: p; input_size must be divisible by it.
    hidden_size: D, the token width (divisible by 4 and by num_heads).
    depth: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width is int(D * mlp_ratio).
    num_classes: 0 for an unconditional model (no label table); K > 0 adds a (K + 1, D) label
      table whose row K is the null class (classifier-free guidance).
    dtype: computation dtype; params are always float32 and the output is float32.
    attention_impl: "auto" | "xla" | "cudnn" (layers.attention_op).

  Submodules: `x_embedder`, `t_embedder_0`, `t_embedder_1`, `y_embedder` (conditional only),
  `blocks_0` .. `blocks_{depth-1}`, `final_layer`.
  """

  input_size: int
  in_channels: int
  out_channels: int
  patch_size: int = 2
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  num_classes: int = 0
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    noise_labels: jax.Array,
    class_labels: jax.Array | None = None,
    *,
    train: bool,
  ) -> jax.Array:
    """Apply the network.

    Args:
      x: (B, H, W, C) NHWC input, H == W == input_size, C == in_channels.
      noise_labels: (B,) c_noise(sigma) (already 250 * ln sigma).
      class_labels: (B,) integer labels in [0, num_classes] (num_classes is the null class);
        required iff num_classes > 0, else must be None. An index past the table gives NaN
        (jnp.take's fill mode), it is not checked under jit.
      train: accepted for the UNet's call signature; DiT has no dropout, so it changes nothing.

    Returns:
      (B, H, W, out_channels) float32.
    """
    del train
    p, d = self.patch_size, self.hidden_size
    expected = (self.input_size, self.input_size, self.in_channels)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f"DiT expects (B, {expected}) NHWC input, got {x.shape}")
    if self.input_size % p:
      raise ValueError(f"DiT input {x.shape[1:3]} (H, W) is not divisible by the patch size {p}")
    if d % self.num_heads:
      raise ValueError(f"DiT hidden_size {d} is not divisible by num_heads {self.num_heads}")
    h = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_flat_xavier_uniform,
      bias_init=nn.initializers.zeros,
      name="x_embedder",
    )(x)
    h = h.astype(jnp.float32) + jnp.asarray(pos_embed_2d(self.input_size // p, d))

    normal = nn.initializers.normal(stddev=0.02)
    t = positional_embedding(noise_labels, NOISE_EMBED_CHANNELS)
    t = nn.Dense(d, dtype=self.dtype, kernel_init=normal, name="t_embedder_0")(t)
    c = nn.Dense(d, dtype=self.dtype, kernel_init=normal, name="t_embedder_1")(nn.silu(t))
    c = LabelEmbedding(self.num_classes, d, 0.02, name="y_embedder")(class_labels, c)

    for i in range(self.depth):
      h = DiTBlock(
        d,
        self.num_heads,
        mlp_ratio=self.mlp_ratio,
        dtype=self.dtype,
        attention_impl=self.attention_impl,
        name=f"blocks_{i}",
      )(h, c)
    out = FinalLayer(d, p, self.out_channels, dtype=self.dtype, name="final_layer")(h, c)
    return unpatchify(out, p, self.out_channels).astype(jnp.float32)

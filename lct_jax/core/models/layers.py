"""Building blocks of EDM's ADM re-implementation (DhariwalUNet), written in Flax Linen.

This module owns the layers that `lct_jax.core.models.unet.DhariwalUNet` is assembled from, each
parameter for parameter the same as its counterpart in EDM (Karras et al. 2022):

* the EDM weight initialisation (`edm_kaiming_uniform`),
* `Linear` and `Conv2d` (with EDM's [1,1] box-filter resampling: `downsample_2x`, `upsample_2x`),
* normalisation: `GroupNorm` (EDM's group rule), the paper's Non-scaling LayerNorm `NsLN`
  (docs/method.md §3.6; with `use_scale=True` it is the scaled LayerNorm over (H, W, C)), and
  the selection helper `make_norm`,
* multi-head self-attention (`attention_op`, `SelfAttention`),
* the sinusoidal noise embedding (`positional_embedding`) and the class-label table
  (`LabelEmbedding`, shared with the DiT),
* the residual block `UNetBlock`.

Layout is NHWC, convolution kernels are HWIO, dense kernels are (in, out). Parameters are always
float32; `dtype` is the computation dtype of convolutions, dense layers and attention. Norms are
computed in float32 and return float32.
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[[jax.Array, tuple[int, ...], Dtype], jax.Array]

# EDM's DhariwalUNet gains: `init` (kaiming_uniform, weight and bias gain sqrt(1/3)).
EDM_INIT_GAIN = math.sqrt(1.0 / 3.0)
NORM_KINDS = ("group", "layer", "nsln")


def edm_kaiming_uniform(fan_in: int, gain: float) -> Initializer:
  """EDM's `weight_init(mode='kaiming_uniform') * gain` as a Flax initializer.

  EDM draws sqrt(3 / fan_in) * (2U - 1), U ~ Uniform[0, 1), and multiplies by `init_weight`
  (weights) or `init_bias` (biases). Both use the fan-in of the layer's weight, so with gain
  sqrt(1/3) every entry is uniform on [-1/sqrt(fan_in), 1/sqrt(fan_in)].

  Args:
    fan_in: fan-in of the layer's weight (in_features, or in_channels * k * k).
    gain: EDM's init_weight / init_bias. 0 gives EDM's `init_zero`.

  Returns:
    An initializer `(key, shape, dtype) -> array`.
  """
  bound = gain * math.sqrt(3.0 / fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    if gain == 0:
      return jnp.zeros(shape, dtype)
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def downsample_2x(x: jax.Array) -> jax.Array:
  """EDM's [1,1]-filter downsampling: 2x2 average pooling with stride 2 (odd edges dropped).

  Args:
    x: (B, H, W, C).

  Returns:
    (B, H // 2, W // 2, C), same dtype.
  """
  b, h, w, c = x.shape
  x = x[:, : 2 * (h // 2), : 2 * (w // 2)]
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.astype(jnp.float32).mean(axis=(2, 4)).astype(x.dtype)


def upsample_2x(x: jax.Array) -> jax.Array:
  """EDM's [1,1]-filter upsampling (transposed conv with a 2x2 all-ones kernel): nearest 2x.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, 2H, 2W, C), same dtype.
  """
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Linear(nn.Module):
  """EDM `Linear`: y = x W + b with kernel (in, out), EDM kaiming-uniform init."""

  features: int
  use_bias: bool = True
  init_weight: float = EDM_INIT_GAIN
  init_bias: float = EDM_INIT_GAIN
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x (..., in). Returns: (..., features) in `dtype`."""
    fan_in = x.shape[-1]
    w = self.param(
      "kernel", edm_kaiming_uniform(fan_in, self.init_weight), (fan_in, self.features), jnp.float32
    )
    y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    if self.use_bias:
      b = self.param("bias", edm_kaiming_uniform(fan_in, self.init_bias), (self.features,))
      y = y + b.astype(self.dtype)
    return y


class Conv2d(nn.Module):
  """EDM `Conv2d` (non-fused): optional [1,1] resampling, then a k x k 'same' convolution.

  `kernel_size=0` gives EDM's weightless resampling-only layer (then `features` must equal the
  input channel count). Kernel (k, k, in, out) (HWIO, Flax's), fan_in = in_channels * k * k
  for weight and bias init.
  """

  features: int
  kernel_size: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  init_weight: float = EDM_INIT_GAIN
  init_bias: float = EDM_INIT_GAIN
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x (B, H, W, Cin). Returns: (B, H', W', features) in `dtype` (H' = 2H / H/2 / H)."""
    assert not (self.up and self.down), "Conv2d: up and down are exclusive"
    cin = x.shape[-1]
    x = x.astype(self.dtype)
    if self.up:
      x = upsample_2x(x)
    if self.down:
      x = downsample_2x(x)
    k = self.kernel_size
    if not k:
      assert self.features == cin, "a weightless Conv2d cannot change the channel count"
      return x
    fan_in = cin * k * k
    w = self.param(
      "kernel", edm_kaiming_uniform(fan_in, self.init_weight), (k, k, cin, self.features)
    )
    pad = k // 2
    y = jax.lax.conv_general_dilated(
      x,
      w.astype(self.dtype),
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      b = self.param("bias", edm_kaiming_uniform(fan_in, self.init_bias), (self.features,))
      y = y + b.astype(self.dtype)
    return y


def normalize(x: jax.Array, groups: int, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) per sample and channel group, over every non-batch axis; float32.

  The statistics of group g of sample b are over all of (H, W) and the channels of the group
  (channels are split into `groups` consecutive groups; groups=1 normalises over all of (H, W, C)),
  biased variance, as torch's group_norm and layer_norm.

  The statistics take one pass over x:

  * d = x - k, shifted by the group's first element k;
  * per-channel sums of d and d^2 over the spatial axes: one column reduction of the NHWC tensor,
    which XLA emits as a single kernel for both;
  * sums over each group's channels on the small (B, C) result.

  The shift keeps var = E[d^2] - E[d]^2 and d - E[d] as accurate as a two-pass computation when
  the mean is large against the spread.

  Its derivative is written out (`jax.custom_jvp`): dy = rstd (dx - E[dx] - y E[y dx]) per group.
  Linear in dx, it transposes to the closed-form backward dx = rstd (g - E[g] - y E[y g]): two
  group sums and one elementwise pass, where autodiff of the one-pass statistics takes more
  passes. Forward mode (`jax.jvp`) and higher derivatives keep working through it.

  Args:
    x: (B, ..., C), C divisible by `groups`.
    groups: number of channel groups.
    epsilon: added to the variance.

  Returns:
    float32, the shape of x.
  """
  return _normalize(x.astype(jnp.float32), groups, epsilon)


def _group_ops(h: jax.Array, groups: int):
  """(group_mean, to_channels) for an NHWC-like h: (B, ..., C) -> (B, groups) and back."""
  b, c = h.shape[0], h.shape[-1]
  cg = c // groups
  spatial = tuple(range(1, h.ndim - 1))
  count = math.prod(h.shape[1:-1]) * cg

  def group_mean(v):
    return v.sum(axis=spatial).reshape(b, groups, cg).sum(axis=-1) / count

  def to_channels(per_group):
    return jnp.repeat(per_group, cg, axis=1).reshape((b,) + (1,) * len(spatial) + (c,))

  return group_mean, to_channels


def _normalize_and_rstd(h: jax.Array, groups: int, epsilon: float):
  group_mean, to_channels = _group_ops(h, groups)
  cg = h.shape[-1] // groups
  k = h[(slice(None),) + (0,) * (h.ndim - 2) + (slice(None, None, cg),)]
  d = h - to_channels(k)
  m1, m2 = group_mean(d), group_mean(jnp.square(d))
  rstd = to_channels(jax.lax.rsqrt(jnp.maximum(m2 - jnp.square(m1), 0.0) + epsilon))
  return (d - to_channels(m1)) * rstd, rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _normalize(h: jax.Array, groups: int, epsilon: float) -> jax.Array:
  return _normalize_and_rstd(h, groups, epsilon)[0]


@_normalize.defjvp
def _normalize_jvp(groups, epsilon, primals, tangents):
  (h,), (dh,) = primals, tangents
  y, rstd = _normalize_and_rstd(h, groups, epsilon)
  group_mean, to_channels = _group_ops(h, groups)
  return y, rstd * (dh - to_channels(group_mean(dh)) - y * to_channels(group_mean(y * dh)))


class GroupNorm(nn.Module):
  """EDM `GroupNorm`: groups = min(num_groups, C // min_channels_per_group), eps 1e-5, affine per C.

  Computed in float32 (biased variance, as torch.nn.functional.group_norm); returns float32.
  """

  num_groups: int = 32
  min_channels_per_group: int = 4
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x (B, H, W, C). Returns: normalised x, float32."""
    c = x.shape[-1]
    groups = min(self.num_groups, c // self.min_channels_per_group)
    assert groups >= 1 and c % groups == 0, f"GroupNorm: bad group count {groups} for {c} channels"
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    h = normalize(x, groups, self.epsilon)
    return h * scale + bias


class NsLN(nn.Module):
  """Non-scaling LayerNorm (docs/method.md §3.6) over all non-batch axes of each sample.

  y = (h - mean(h)) / sqrt(var(h) + eps) + beta, with no scale. beta is learnable, of shape
  x.shape[1:] (e.g. (H, W, C)). With `use_scale=True` a learnable gamma of the same shape
  multiplies the normalised value: the ordinary (scaled) LayerNorm over (H, W, C), the "layer"
  option. Float32 in and out.
  """

  use_scale: bool = False
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x (B, ...). Returns: normalised x, float32."""
    shape = x.shape[1:]
    h = normalize(x, 1, self.epsilon)
    if self.use_scale:
      h = h * self.param("scale", nn.initializers.ones, shape, jnp.float32)
    return h + self.param("bias", nn.initializers.zeros, shape, jnp.float32)


def make_norm(kind: str, name: str | None = None) -> nn.Module:
  """Normalisation layer selection.

  Args:
    kind: "group" (EDM GroupNorm), "layer" (LayerNorm over (H, W, C) with scale and shift) or
      "nsln" (Non-scaling LayerNorm over (H, W, C), shift only).
    name: submodule name.

  Returns:
    An unbound Flax module (bound to the enclosing compact module when called inside one).
  """
  if kind == "group":
    return GroupNorm(name=name)
  if kind == "layer":
    return NsLN(use_scale=True, name=name)
  if kind == "nsln":
    return NsLN(use_scale=False, name=name)
  raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")


def positional_embedding(
  x: jax.Array, num_channels: int, max_positions: int = 10000, endpoint: bool = False
) -> jax.Array:
  """EDM `PositionalEmbedding`: [cos(x f_k), sin(x f_k)].

  f_k = (1/max_positions)^(k/(C/2 - endpoint)).

  Args:
    x: (B,) positions (here c_noise(sigma)).
    num_channels: C, even; C/2 frequencies, k = 0..C/2-1.
    max_positions: base of the geometric frequency ladder.
    endpoint: EDM's flag; if True the last frequency is exactly 1/max_positions.

  Returns:
    (B, C) float32, cosines first.
  """
  half = num_channels // 2
  freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
  freqs = (1.0 / max_positions) ** freqs
  arg = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=1)


class LabelEmbedding(nn.Module):
  """Adds the row of each class label to a conditioning vector (docs/method.md §4.4).

  `num_classes` = 0: no table; the labels must be None and the vector is returned as it is.
  K > 0: a float32 table `embedding` of K + 1 rows (row K is the null class of classifier-free
  guidance), initialised normal(0, `init_std`); the labels (B,) int32 in [0, K] are required.
  """

  num_classes: int
  features: int
  init_std: float

  @nn.compact
  def __call__(self, labels: jax.Array | None, emb: jax.Array) -> jax.Array:
    """Args: labels (B,) or None; emb (B, features). Returns: emb + table[labels]."""
    if self.num_classes == 0:
      if labels is not None:
        raise ValueError("class labels given to an unconditional network (num_classes=0)")
      return emb
    if labels is None:
      raise ValueError(
        f"a class-conditional network (num_classes={self.num_classes}) needs class labels"
      )
    table = self.param(
      "embedding",
      nn.initializers.normal(self.init_std),
      (self.num_classes + 1, self.features),
      jnp.float32,
    )
    return emb + jnp.take(table, labels, axis=0).astype(emb.dtype)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def attention_op(qkv: jax.Array, num_heads: int, implementation: str = "auto") -> jax.Array:
  """Multi-head softmax self-attention over the spatial positions, EDM channel layout.

  The 3C channels of `qkv` are laid out as (head, channel-in-head, {q, k, v}), like EDM's
  `reshape(B * heads, C // heads, 3, -1)`. The output channel is head * (C // heads) + c. So EDM
  weights port by transposing kernels only. Logits and softmax are float32, as in EDM's
  AttentionOp: `jax.nn.dot_product_attention` accumulates the logits in float32 whatever the
  input dtype. The weighted sum of values runs in qkv's dtype.

  Args:
    qkv: (B, H, W, 3C).
    num_heads: number of heads; C must be divisible by it.
    implementation: "xla" (logits materialised), "cudnn" (fused flash attention; GPU, bfloat16 or
      float16 only) or "auto": cudnn where it applies, else xla.

  Returns:
    (B, H, W, C) in qkv's dtype.
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  assert c % num_heads == 0, f"attention: {c} channels not divisible into {num_heads} heads"
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(
      f"attention implementation must be one of {ATTENTION_IMPLS}, got {implementation!r}"
    )
  if implementation == "auto":
    fused = jax.default_backend() == "gpu" and qkv.dtype in (jnp.bfloat16, jnp.float16)
    implementation = "cudnn" if fused else "xla"
  t = qkv.reshape(b, h * w, num_heads, c // num_heads, 3)
  out = jax.nn.dot_product_attention(t[..., 0], t[..., 1], t[..., 2], implementation=implementation)
  return out.reshape(b, h, w, c)


class SelfAttention(nn.Module):
  """EDM UNetBlock's attention branch with its residual: x + proj(attn(qkv(norm2(x)))).

  qkv is a 1x1 conv C -> 3C with the EDM init, proj a zero-initialised 1x1 conv C -> C.
  Submodules: `norm2`, `qkv`, `proj` (EDM's names).
  """

  num_heads: int
  norm: str = "group"
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x (B, H, W, C). Returns: (B, H, W, C), dtype of x promoted with `dtype`."""
    c = x.shape[-1]
    conv = functools.partial(Conv2d, dtype=self.dtype)
    h = make_norm(self.norm, name="norm2")(x)
    qkv = conv(3 * c, 1, name="qkv")(h)
    a = attention_op(qkv, self.num_heads, self.attention_impl)
    out = conv(c, 1, init_weight=0.0, init_bias=0.0, name="proj")(a)
    return x + out


class UNetBlock(nn.Module):
  """EDM `UNetBlock` as DhariwalUNet configures it (ADM residual block).

  * norm0 -> SiLU -> conv0 (3x3, with up/down resampling);
  * x = SiLU(shift + norm1(x) * (scale + 1)) with (scale, shift) = affine(emb);
  * dropout -> conv1 (3x3, zero init);
  * + skip (skip_scale = 1). skip is a 1x1 conv (after resampling) if the channel count changes,
    else the (resampled) input.

  If `attention` and out_channels // channels_per_head > 0, a `SelfAttention` branch (submodule
  `attn`) follows. With fewer channels than one head, EDM silently has none.
  """

  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  norm: str = "group"
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @property
  def num_heads(self) -> int:
    """EDM's head count: out_channels // channels_per_head when attention is on, else 0."""
    return self.out_channels // self.channels_per_head if self.attention else 0

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool) -> jax.Array:
    """Apply the block.

    Args:
      x: (B, H, W, Cin).
      emb: (B, E) embedding (already through SiLU).
      train: enables dropout (rng collection 'dropout').

    Returns:
      (B, H', W', out_channels).
    """
    cin = x.shape[-1]
    cout = self.out_channels
    conv = functools.partial(Conv2d, dtype=self.dtype)
    resample = dict(up=self.up, down=self.down)
    h = nn.silu(make_norm(self.norm, name="norm0")(x))
    h = conv(cout, 3, name="conv0", **resample)(h)
    params = Linear(2 * cout, dtype=self.dtype, name="affine")(emb).astype(jnp.float32)
    scale, shift = params[:, None, None, :cout], params[:, None, None, cout:]
    h = nn.silu(shift + make_norm(self.norm, name="norm1")(h) * (scale + 1.0))
    h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
    h = conv(cout, 3, init_weight=0.0, init_bias=0.0, name="conv1")(h)
    if cout != cin:
      skip = conv(cout, 1, name="skip", **resample)(x)
    else:
      skip = conv(cout, 0, name="skip", **resample)(x) if (self.up or self.down) else x
    x = h + skip.astype(h.dtype)
    if self.num_heads:
      x = SelfAttention(
        self.num_heads,
        norm=self.norm,
        dtype=self.dtype,
        attention_impl=self.attention_impl,
        name="attn",
      )(x)
    return x

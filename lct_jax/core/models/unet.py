"""EDM's ADM re-implementation `DhariwalUNet` (Karras et al. 2022) in Flax Linen.

This module owns the network used for all paper results (docs/method.md §4.1). Unconditional, it
has exactly the parameters of EDM's `training/networks.py::DhariwalUNet` without label or
augmentation embedding. The intended differences are:

* the switchable final norm: EDM GroupNorm, LayerNorm or the paper's Non-scaling LayerNorm over
  (H, W, C) (docs/method.md §3.6);
* the `nsln_everywhere` ablation;
* class conditioning (docs/method.md §4.4) by a table of num_classes + 1 rows (`map_label`, the
  last row the null class), added where EDM adds its label term; EDM's null label is the zero
  vector instead.

Submodule names follow EDM's (`enc_32x32_block0`, `dec_4x4_in0`, `map_layer0`, `out_norm`, ...),
with '.' replaced by '_'.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lct_jax.core.models.layers import (
  NORM_KINDS,
  Conv2d,
  LabelEmbedding,
  Linear,
  UNetBlock,
  make_norm,
  positional_embedding,
)

# EDM's label map (kaiming-normal, init_weight sqrt(label_dim), on one-hot labels) gives every
# entry of a class's row a standard normal start.
LABEL_INIT_STD = 1.0


class DhariwalUNet(nn.Module):
  """EDM DhariwalUNet (ADM): NHWC in, NHWC out.

  Attributes:
    img_resolution: H == W of the input.
    in_channels: input channels.
    out_channels: output channels.
    model_channels: base channel count (embedding width is 4x this).
    channel_mult: per-resolution channel multipliers.
    num_blocks: residual blocks per resolution in the encoder (decoder: num_blocks + 1).
    attn_resolutions: resolutions whose (non-resampling) blocks have self-attention.
    dropout: dropout rate inside the residual blocks.
    final_norm: "group" | "layer" | "nsln" for the output norm.
    nsln_everywhere: ablation; every inner GroupNorm becomes an NsLN over (H, W, C) too.
    dtype: computation dtype; params are always float32 and the output is float32.
    attention_impl: "auto" | "xla" | "cudnn" (layers.attention_op).
    num_classes: 0 (unconditional) or K > 0: labels 0..K-1 and the null class K.
  """

  img_resolution: int
  in_channels: int
  out_channels: int
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16, 8)
  dropout: float = 0.0
  final_norm: str = "nsln"
  nsln_everywhere: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  num_classes: int = 0

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
      x: (B, H, W, C) NHWC input, H == W == img_resolution, C == in_channels.
      noise_labels: (B,) c_noise(sigma) (already 250 * ln sigma).
      class_labels: (B,) int32 in [0, num_classes] (num_classes: the null class); required
        exactly when num_classes > 0.
      train: enables dropout, which draws from the 'dropout' rng collection, so two calls given
        the same 'dropout' key get identical masks (student and teacher share dropout).

    Returns:
      (B, H, W, out_channels) float32.
    """
    if self.final_norm not in NORM_KINDS:
      raise ValueError(f"final_norm must be one of {NORM_KINDS}, got {self.final_norm!r}")
    expected = (self.img_resolution, self.img_resolution, self.in_channels)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f"DhariwalUNet expects (B, {expected}) NHWC input, got {x.shape}")
    attn_res = tuple(self.attn_resolutions)
    block = functools.partial(
      UNetBlock,
      dropout=self.dropout,
      norm="nsln" if self.nsln_everywhere else "group",
      dtype=self.dtype,
      attention_impl=self.attention_impl,
    )
    conv = functools.partial(Conv2d, dtype=self.dtype)

    # Mapping: Linear -> SiLU -> Linear [+ label row] -> SiLU (EDM's order).
    emb_channels = 4 * self.model_channels
    emb = positional_embedding(noise_labels, self.model_channels)
    emb = nn.silu(Linear(emb_channels, dtype=self.dtype, name="map_layer0")(emb))
    emb = Linear(emb_channels, dtype=self.dtype, name="map_layer1")(emb)
    label_emb = LabelEmbedding(self.num_classes, emb_channels, LABEL_INIT_STD, name="map_label")
    emb = nn.silu(label_emb(class_labels, emb))

    # Encoder: every output (the stem conv and every block) is kept as a skip.
    skips = []
    h = x
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f"{res}x{res}"
      if level == 0:
        h = conv(self.model_channels * mult, 3, name=f"enc_{tag}_conv")(h)
      else:
        h = block(h.shape[-1], down=True, name=f"enc_{tag}_down")(h, emb, train=train)
      skips.append(h)
      for idx in range(self.num_blocks):
        h = block(
          self.model_channels * mult, attention=res in attn_res, name=f"enc_{tag}_block{idx}"
        )(h, emb, train=train)
        skips.append(h)

    # Decoder: in0 (always with attention) / in1 at the lowest resolution, an up block elsewhere,
    # then num_blocks + 1 blocks each consuming one skip by channel concatenation.
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      tag = f"{res}x{res}"
      if level == len(self.channel_mult) - 1:
        h = block(h.shape[-1], attention=True, name=f"dec_{tag}_in0")(h, emb, train=train)
        h = block(h.shape[-1], name=f"dec_{tag}_in1")(h, emb, train=train)
      else:
        h = block(h.shape[-1], up=True, name=f"dec_{tag}_up")(h, emb, train=train)
      for idx in range(self.num_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = block(
          self.model_channels * mult, attention=res in attn_res, name=f"dec_{tag}_block{idx}"
        )(h, emb, train=train)

    h = nn.silu(make_norm(self.final_norm, name="out_norm")(h))
    h = conv(self.out_channels, 3, init_weight=0.0, init_bias=0.0, name="out_conv")(h)
    return h.astype(jnp.float32)

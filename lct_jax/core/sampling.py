"""One-step and multistep consistency sampling (docs/method.md §6).

Owns `make_sampler`: x = f(sigma_max z, sigma_max), then for each intermediate sigma s:
x = f(x + sqrt(s^2 - sigma_min^2) z_s, s). Sample i draws all of its noise from fold_in(key, i), so
a sample set does not depend on the device count or the batch size.

A class-conditional network samples class `class_label`, or class i mod K for sample i
(`sample_classes`). With a guidance scale s != 1 (classifier-free guidance, docs/method.md §6.3)
every evaluation of F is F_null + s (F_cond - F_null), one network call on the doubled batch.
"""

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lct_jax.core import karras
from lct_jax.core import mesh as mesh_lib


def sample_noise(
  key: jax.Array, indices: jax.Array, draw: int, shape: tuple[int, ...]
) -> jax.Array:
  """Standard normal noise (B, *shape) for draw number `draw` of each global sample index."""

  def one(i):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), draw), shape)

  return jax.vmap(one)(indices)


def sample_classes(indices: jax.Array, num_classes: int, class_label: int = -1) -> jax.Array:
  """The class of each global sample index: `class_label`, or index mod num_classes if it is -1."""
  indices = jnp.asarray(indices, jnp.int32)
  if class_label >= 0:
    return jnp.full_like(indices, class_label)
  return indices % num_classes


def guided(
  apply: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
  num_classes: int,
  class_labels: jax.Array | None,
  cfg_scale: float,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """F(x_in, noise_labels) for `consistency_fn`: conditional, unconditional or guided.

  Args:
    apply: the network, apply(x_in, noise_labels, class_labels).
    num_classes: K (0: unconditional; then `class_labels` is None and the scale must be 1).
    class_labels: (B,) int32 labels in [0, K].
    cfg_scale: s; 1 calls the network once on the labels, otherwise
      F = F_null + s (F_cond - F_null) with F_null at the null class K, computed by one call on
      the batch and its copy with null labels.
  """
  if cfg_scale == 1:
    return lambda x_in, noise: apply(x_in, noise, class_labels)
  if num_classes == 0:
    raise ValueError(f"cfg_scale={cfg_scale}: guidance needs a class-conditional network")

  def net(x_in, noise):
    b = x_in.shape[0]
    both = apply(
      jnp.concatenate([x_in, x_in]),
      jnp.concatenate([noise, noise]),
      jnp.concatenate([class_labels, jnp.full_like(class_labels, num_classes)]),
    ).astype(jnp.float32)
    f_cond, f_null = both[:b], both[b:]
    return f_null + cfg_scale * (f_cond - f_null)

  return net


def make_sampler(
  model: nn.Module,
  noise_cfg: karras.NoiseConfig,
  example_shape: tuple[int, ...],
  mesh: Mesh,
  sigma_mids: Sequence[float] = (),
  cfg_scale: float = 1.0,
  class_label: int = -1,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """Builds `sample(params, key, indices) -> x0` with 1 + len(sigma_mids) steps.

  Args:
    model: the network F (its `num_classes`, 0 if it has none, says whether it is conditional).
    noise_cfg: noise constants (sigma_max is the starting level).
    example_shape: (H, W, C) of one sample.
    mesh: device mesh; `indices` (B,) int32 global sample indices are sharded over its axes.
    sigma_mids: intermediate noise levels, in the order they are used (e.g. (0.821,) for 2 NFE).
    cfg_scale: classifier-free guidance scale s (1: off; a conditional network only).
    class_label: the class to sample, or -1 for class index mod K (`sample_classes`).

  Returns:
    A jitted function giving float32 samples (B, H, W, C) in normalized latent space, unclipped.
    Params may come in any sharding over `mesh` (replicated, or the train state's).
  """
  for s in sigma_mids:
    if not noise_cfg.sigma_min < s < noise_cfg.sigma_max:
      raise ValueError(f"intermediate sigma {s} must lie in (sigma_min, sigma_max)")
  num_classes = getattr(model, "num_classes", 0)

  def sample(params, key, indices):
    def apply(x_in, noise, labels):
      extra = () if labels is None else (labels,)  # unconditional: called as (x, noise)
      return model.apply({"params": params}, x_in, noise, *extra, train=False)

    labels = sample_classes(indices, num_classes, class_label) if num_classes else None
    net = guided(apply, num_classes, labels, cfg_scale)
    batch = indices.shape[0]

    def f(x, s):
      return karras.consistency_fn(net, x, jnp.full((batch,), s, jnp.float32), noise_cfg)

    x = f(noise_cfg.sigma_max * sample_noise(key, indices, 0, example_shape), noise_cfg.sigma_max)
    for draw, s in enumerate(sigma_mids, start=1):
      z = sample_noise(key, indices, draw, example_shape)
      x = f(x + jnp.sqrt(s**2 - noise_cfg.sigma_min**2) * z, s)
    return x

  data = mesh_lib.batch_sharding(mesh)
  # Params: None leaves their sharding to the caller (replicated or split over "fsdp").
  return jax.jit(
    sample, in_shardings=(None, mesh_lib.replicated(mesh), data), out_shardings=data
  )


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One sampler of the eval job: 1 + len(sigma_mids) steps, guided when cfg_scale != 1."""

  sigma_mids: tuple[float, ...] = ()
  cfg_scale: float = 1.0

  @property
  def steps(self) -> int:
    return 1 + len(self.sigma_mids)

  @property
  def nfe(self) -> int:
    """Network evaluations per sample: a guided step counts 2 (conditional and null)."""
    return self.steps * (1 if self.cfg_scale == 1 else 2)

  @property
  def name(self) -> str:
    """ "nfe1", "nfe2_sigma0.821", "nfe2_cfg1.5", ...: the result file's name (6 significant
    digits)."""
    name = f"nfe{self.nfe}"
    if self.sigma_mids:
      name += "_sigma" + "_".join(f"{s:g}" for s in self.sigma_mids)
    if self.cfg_scale != 1:
      name += f"_cfg{self.cfg_scale:g}"
    return name

  def fields(self) -> dict[str, Any]:
    """What a result records about the sampler."""
    sigma_mid = self.sigma_mids[0] if self.sigma_mids else None
    return dict(
      nfe=self.nfe,
      steps=self.steps,
      sigma_mid=sigma_mid,
      sigma_mids=list(self.sigma_mids),
      cfg_scale=self.cfg_scale,
    )


def sweep(sigma_mids: Sequence[float], cfg_scale: float = 1.0) -> list[SamplerSpec]:
  """1 step, then 2 steps for each eval.sigma_mid, all at guidance scale `cfg_scale`."""
  scale = float(cfg_scale)
  return [SamplerSpec((), scale)] + [SamplerSpec((float(s),), scale) for s in sigma_mids]

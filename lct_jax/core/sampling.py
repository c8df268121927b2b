"""One-step and multistep consistency sampling (docs/method.md §6).

Owns `make_sampler`: x = f(sigma_max z, sigma_max), then for each intermediate sigma s:
x = f(x + sqrt(s^2 - sigma_min^2) z_s, s). Sample i draws all of its noise from fold_in(key, i), so
a sample set does not depend on the device count or the batch size.
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


def make_sampler(
  model: nn.Module,
  noise_cfg: karras.NoiseConfig,
  example_shape: tuple[int, ...],
  mesh: Mesh,
  sigma_mids: Sequence[float] = (),
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """Builds `sample(params, key, indices) -> x0` with 1 + len(sigma_mids) network evaluations.

  Args:
    model: the network F.
    noise_cfg: noise constants (sigma_max is the starting level).
    example_shape: (H, W, C) of one sample.
    mesh: device mesh; `indices` (B,) int32 global sample indices are sharded over "data".
    sigma_mids: intermediate noise levels, in the order they are used (e.g. (0.821,) for 2 NFE).

  Returns:
    A jitted function giving float32 samples (B, H, W, C) in normalized latent space, unclipped.
  """
  for s in sigma_mids:
    if not noise_cfg.sigma_min < s < noise_cfg.sigma_max:
      raise ValueError(f"intermediate sigma {s} must lie in (sigma_min, sigma_max)")

  def net_fn(params):
    def net(x_in, labels):
      return model.apply({"params": params}, x_in, labels, train=False)

    return net

  def sample(params, key, indices):
    net = net_fn(params)
    batch = indices.shape[0]

    def f(x, s):
      return karras.consistency_fn(net, x, jnp.full((batch,), s, jnp.float32), noise_cfg)

    x = f(noise_cfg.sigma_max * sample_noise(key, indices, 0, example_shape), noise_cfg.sigma_max)
    for draw, s in enumerate(sigma_mids, start=1):
      z = sample_noise(key, indices, draw, example_shape)
      x = f(x + jnp.sqrt(s**2 - noise_cfg.sigma_min**2) * z, s)
    return x

  data = mesh_lib.batch_sharding(mesh)
  return jax.jit(
    sample,
    in_shardings=(mesh_lib.replicated(mesh), mesh_lib.replicated(mesh), data),
    out_shardings=data,
  )


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One sampler of the eval job: 1 + len(sigma_mids) network evaluations."""

  sigma_mids: tuple[float, ...] = ()

  @property
  def nfe(self) -> int:
    return 1 + len(self.sigma_mids)

  @property
  def name(self) -> str:
    """ "nfe1", "nfe2_sigma0.821", ...: the result file's name (6 significant digits)."""
    if not self.sigma_mids:
      return "nfe1"
    return f"nfe{self.nfe}_sigma" + "_".join(f"{s:g}" for s in self.sigma_mids)

  def fields(self) -> dict[str, Any]:
    """What a result records about the sampler."""
    sigma_mid = self.sigma_mids[0] if self.sigma_mids else None
    return dict(nfe=self.nfe, sigma_mid=sigma_mid, sigma_mids=list(self.sigma_mids))


def sweep(sigma_mids: Sequence[float]) -> list[SamplerSpec]:
  """1 step, then 2 steps for each intermediate sigma (eval.sigma_mid)."""
  return [SamplerSpec()] + [SamplerSpec((float(s),)) for s in sigma_mids]

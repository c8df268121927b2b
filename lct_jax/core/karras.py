"""The Karras/EDM noise grid and the consistency-function parameterization.

docs/method.md §1 defines the grid, §2.1 the parameterization.

Owns: the sigma grid sigma_i (index 0 = sigma_max, descending), c_skip / c_out / c_in / c_noise and
the consistency function f(x, sigma) = c_skip x + c_out F(c_in x, c_noise). Everything is a traced
function of its arguments, so a change of the number of grid points N never recompiles.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """Constants of the VE forward process x_sigma = x + sigma n (docs/method.md §1)."""

  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  sigma_data: float = 0.5


def karras_sigma(i: jax.Array, num_scales: jax.Array, cfg: NoiseConfig) -> jax.Array:
  """sigma_i on the N-point Karras grid, index 0 = sigma_max, index N - 1 = sigma_min.

  Args:
    i: integer (or float) index, any shape.
    num_scales: N, the number of grid points (traced scalar or broadcastable to i).
    cfg: noise constants.

  Returns:
    (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float32; exactly
    sigma_min at i = N - 1 (the formula gives 0.0019999996 there in float32, and with it a
    nonzero c_out: the boundary condition f(x, sigma_min) = x would not hold on the grid).
  """
  inv_rho = 1.0 / cfg.rho
  hi = cfg.sigma_max**inv_rho
  lo = cfg.sigma_min**inv_rho
  i = jnp.asarray(i, jnp.float32)
  last = jnp.asarray(num_scales, jnp.float32) - 1.0
  sigma = (hi + i / last * (lo - hi)) ** cfg.rho
  return jnp.where(i == last, jnp.float32(cfg.sigma_min), sigma)


def scalings(sigma: jax.Array, cfg: NoiseConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """c_skip, c_out, c_in of the consistency parameterization; f(x, sigma_min) = x exactly."""
  sd2 = cfg.sigma_data**2
  shifted = sigma - cfg.sigma_min
  c_skip = sd2 / (shifted**2 + sd2)
  c_out = cfg.sigma_data * shifted / jnp.sqrt(sigma**2 + sd2)
  c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
  return c_skip, c_out, c_in


def c_noise(sigma: jax.Array) -> jax.Array:
  """The network's noise label: 1000 * 0.25 * ln(sigma) (the 1e-44 of [C] is below float32)."""
  return 250.0 * jnp.log(sigma)


def consistency_fn(
  net: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array, cfg: NoiseConfig
) -> jax.Array:
  """f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).

  Args:
    net: F, called as net(scaled_input, noise_labels) with noise_labels of shape (B,).
    x: noisy input (B, ...).
    sigma: per-sample noise level, shape (B,).
    cfg: noise constants.

  Returns:
    The consistency function's output, float32, same shape as x.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  c_skip, c_out, c_in = (_expand(s, x.ndim) for s in scalings(sigma, cfg))
  out = net(c_in * x, c_noise(sigma)).astype(jnp.float32)
  return c_skip * x + c_out * out


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a per-sample (B,) array to broadcast against a (B, ...) array of rank ndim."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))

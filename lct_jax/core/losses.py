"""Losses of the training step (docs/method.md §2.4, §3.2, §3.4).

Owns: the robust metrics on the per-sample mean-form residual (Cauchy, pseudo-Huber,
Geman-McClure, L2), the weighted consistency-training loss, and the early-timestep diffusion loss as
a masked mean over the global batch.
"""

import jax
import jax.numpy as jnp


def mean_flat_sq(a: jax.Array, b: jax.Array) -> jax.Array:
  """r2 = mean over all non-batch axes of (a - b)^2, one float32 per sample."""
  d = (a - b).astype(jnp.float32)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def robust_distance(r2: jax.Array, c: jax.Array, kind: str) -> jax.Array:
  """The paper's metrics as functions of the mean-form squared residual r2.

  Args:
    r2: per-sample mean squared residual.
    c: scale (mean-form; a sum-form c equals 64 c at d = 4096).
    kind: "cauchy" log(1 + r2/(2c^2)) | "pseudo_huber" sqrt(r2 + c^2) - c |
      "geman_mcclure" 2 r2 / (r2 + 4 c^2) | "l2" r2.

  Returns:
    The per-sample distance.
  """
  c2 = jnp.square(c)
  if kind == "cauchy":
    return jnp.log1p(r2 / (2.0 * c2))
  if kind == "pseudo_huber":
    return jnp.sqrt(r2 + c2) - c
  if kind == "geman_mcclure":
    return _geman_mcclure(r2, c2)
  if kind == "l2":
    return r2
  raise ValueError(f"unknown robust loss {kind!r}")


@jax.custom_jvp
def _geman_mcclure(r2: jax.Array, c2: jax.Array) -> jax.Array:
  """2 r2 / (r2 + 4 c^2), with derivatives written out: autodiff of the quotient cancels badly in
  float32 once r2 >> c^2 (the late stages, where c is ~2.5e-4)."""
  return 2.0 * r2 / (r2 + 4.0 * c2)


@_geman_mcclure.defjvp
def _geman_mcclure_jvp(primals, tangents):
  r2, c2 = primals
  dr2, dc2 = tangents
  den = r2 + 4.0 * c2
  return _geman_mcclure(r2, c2), (8.0 * c2 * dr2 - 8.0 * r2 * dc2) / jnp.square(den)


def consistency_terms(
  student: jax.Array,
  teacher: jax.Array,
  sigma: jax.Array,
  sigma_next: jax.Array,
  c: jax.Array,
  kind: str,
) -> jax.Array:
  """Per-sample CT loss d(f(x_i), f^-(x_{i+1})) / (sigma_i - sigma_{i+1}).

  Its batch mean is L_CT.
  """
  return robust_distance(mean_flat_sq(student, teacher), c, kind) / (sigma - sigma_next)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(mask * values) / max(sum(mask), 1): a masked mean that is 0, not NaN, for an empty mask.

  Under jit over a sharded batch the two sums are global, so this is the mean over the masked
  samples of the whole batch, not an average of per-device means.
  """
  return masked_sum(values, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum over masked samples; NaN or inf outside the mask does not leak in."""
  return jnp.sum(jnp.where(mask, values, 0.0))


def diffusion_terms(student: jax.Array, x0: jax.Array, weight: jax.Array) -> jax.Array:
  """Per-sample weight(sigma_i) * MSE(f(x_i, sigma_i), x0); L_diff is their masked mean."""
  return weight * mean_flat_sq(student, x0)

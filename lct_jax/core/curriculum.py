"""Curricula of consistency training, all traced functions of the training step.

Owns (docs/method.md §2.2, §2.3, §3.3, §3.4):

* the discretization curriculum N(k);
* the discretized lognormal sampler of the interval index i (fixed-size masked logits, so a change
  of N never recompiles);
* the adaptive scaling-c schedule c(N);
* the early-timestep diffusion-loss mask and weight.

`stage_table` lays the whole schedule out on the host for the `schedule` tool.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf, erfc

from lct_jax.core import karras

LOSSES = ("cauchy", "pseudo_huber", "geman_mcclure", "l2")
C_SCHEDULES = ("adaptive", "constant")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
  """Every constant of the iCT schedule and of the paper's changes to it."""

  noise: karras.NoiseConfig = karras.NoiseConfig()
  p_mean: float = -1.1
  p_std: float = 2.0
  s0: int = 10
  s1: int = 640
  total_steps: int = 764_400
  loss: str = "cauchy"
  c_schedule: str = "adaptive"
  c_constant: float = 0.03456
  c_log_slope: float = -1.15
  c_log_intercept: float = -0.85
  diffusion_weight: float = 5.0
  diffusion_threshold: float = 0.75

  @property
  def stage_length(self) -> int:
    """K' = floor(K / (log2(floor(s1 / s0)) + 1)), at least 1."""
    return max(1, math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)))

  @property
  def max_intervals(self) -> int:
    """The largest N - 1 the curriculum reaches: the fixed size of the interval logits."""
    return self.s1


def num_scales(step: jax.Array, cfg: CurriculumConfig) -> jax.Array:
  """N(k) = min(s0 * 2^floor(k / K'), s1) + 1, int32."""
  # Capped where s0 * 2^j first reaches s1, so the shift cannot overflow int32.
  cap = max(0, math.ceil(math.log2(cfg.s1 / cfg.s0)))
  doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // cfg.stage_length, cap)
  return jnp.minimum(cfg.s0 * jnp.left_shift(1, doublings), cfg.s1) + 1


def interval_log_probs(n: jax.Array, cfg: CurriculumConfig) -> jax.Array:
  """Log-probabilities of the interval index i in {0..N-2}, padded with -inf to s1 entries.

  p(i) is proportional to erf((ln sigma_i - P_mean)/(sqrt2 P_std)) - erf(same at sigma_{i+1}),
  computed from the nearer tail where both arguments have one sign (erfc(b) - erfc(a) above the
  mean, erfc(-a) - erfc(-b) below it), since erf differences near +-1 lose precision in float32.
  """
  idx = jnp.arange(cfg.max_intervals)
  scale = math.sqrt(2.0) * cfg.p_std
  a = (jnp.log(karras.karras_sigma(idx, n, cfg.noise)) - cfg.p_mean) / scale
  b = (jnp.log(karras.karras_sigma(idx + 1, n, cfg.noise)) - cfg.p_mean) / scale
  mass = jnp.where(b > 0, erfc(b) - erfc(a), jnp.where(a < 0, erfc(-a) - erfc(-b), erf(a) - erf(b)))
  valid = (idx < n - 1) & (mass > 0)
  logp = jnp.where(valid, jnp.log(jnp.where(valid, mass, 1.0)), -jnp.inf)
  return logp - jax.nn.logsumexp(logp)


def sample_intervals(key: jax.Array, n: jax.Array, batch: int, cfg: CurriculumConfig) -> jax.Array:
  """Draws `batch` interval indices i (int32) independently from the discretized lognormal."""
  return jax.random.categorical(key, interval_log_probs(n, cfg), shape=(batch,)).astype(jnp.int32)


def scale_c(n: jax.Array, cfg: CurriculumConfig) -> jax.Array:
  """The robust-loss scale c(N): constant, or the adaptive law exp(a ln(N-1) + b) after stage 1."""
  const = jnp.float32(cfg.c_constant)
  if cfg.c_schedule == "constant":
    return const
  law = jnp.exp(cfg.c_log_slope * jnp.log(jnp.asarray(n, jnp.float32) - 1.0) + cfg.c_log_intercept)
  return jnp.where(n <= cfg.s0 + 1, const, law)


def diffusion_mask(i: jax.Array, n: jax.Array, cfg: CurriculumConfig) -> jax.Array:
  """True for samples whose interval index is in the early (low-noise) part: i >= floor(t N)."""
  return i >= jnp.floor(cfg.diffusion_threshold * jnp.asarray(n, jnp.float32)).astype(jnp.int32)


def diffusion_weight(sigma: jax.Array, cfg: CurriculumConfig) -> jax.Array:
  """EDM weighting of the x0 regression: 1/sigma^2 + 1/sigma_data^2."""
  return 1.0 / sigma**2 + 1.0 / cfg.noise.sigma_data**2


def stage_table(cfg: CurriculumConfig) -> list[dict]:
  """The schedule a config trains with, one row per distinct N (host-side, for the tools).

  Returns:
    A list of {"start_step", "end_step", "N", "c", "diff_sigma_max", "diff_fraction"}. end_step
    is inclusive; the last row ends at total_steps - 1. diff_sigma_max is the largest student sigma
    that receives the diffusion loss (0 when the loss is off). diff_fraction is the expected
    fraction of a batch under it.
  """
  rows = []
  step = 0
  while step < cfg.total_steps:
    n = int(num_scales(step, cfg))
    end = cfg.total_steps - 1
    if n - 1 < cfg.s1:
      end = min(end, (step // cfg.stage_length + 1) * cfg.stage_length - 1)
    first = int(math.floor(cfg.diffusion_threshold * n))
    probs = jnp.exp(interval_log_probs(n, cfg))
    on = cfg.diffusion_weight > 0 and first <= n - 2
    rows.append(
      dict(
        start_step=step,
        end_step=end,
        N=n,
        c=float(scale_c(n, cfg)),
        diff_sigma_max=float(karras.karras_sigma(first, n, cfg.noise)) if on else 0.0,
        diff_fraction=float(jnp.sum(probs[first:])) if on else 0.0,
      )
    )
    step = end + 1
  return rows

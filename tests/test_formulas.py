"""Every formula of the core against an independent float64 numpy computation.

The references are written from docs/method.md; each section header below names its section."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from lct_jax.core import curriculum, karras, losses

NOISE = karras.NoiseConfig()
PAPER = curriculum.CurriculumConfig(total_steps=764_400)  # FFHQ: 546 * 1400


# ---- independent float64 references written from docs/method.md --------------------------------
def np_sigmas(n):
  i = np.arange(n, dtype=np.float64)
  return (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7


def np_n_of_k(k, total, s0=10, s1=640):
  kp = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
  return min(s0 * 2 ** math.floor(k / kp), s1) + 1


def np_interval_probs(n):
  s = np_sigmas(n)
  e = special.erf((np.log(s) + 1.1) / (math.sqrt(2) * 2.0))
  p = e[:-1] - e[1:]
  return p / p.sum()


def np_c(n):
  return 0.03456 if n <= 11 else math.exp(-1.15 * math.log(n - 1) - 0.85)


# ---- section 2.1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [11, 21, 641])
def test_karras_sigmas(n):
  got = np.asarray(karras.karras_sigma(jnp.arange(n), n, NOISE), np.float64)
  np.testing.assert_allclose(got, np_sigmas(n), rtol=2e-5)
  assert got[0] == pytest.approx(80.0, rel=1e-6) and got[-1] == pytest.approx(0.002, rel=1e-5)
  assert np.all(np.diff(got) < 0)


def test_scalings_match_numpy():
  sigma = np.geomspace(0.002, 80.0, 50)
  c_skip, c_out, c_in = (
    np.asarray(v, np.float64) for v in karras.scalings(jnp.asarray(sigma), NOISE)
  )
  np.testing.assert_allclose(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25), rtol=1e-5)
  np.testing.assert_allclose(
    c_out, 0.5 * (sigma - 0.002) / np.sqrt(sigma**2 + 0.25), rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + 0.25), rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(karras.c_noise(jnp.asarray(sigma))), 250 * np.log(sigma), rtol=1e-5, atol=1e-4
  )


def test_boundary_condition_is_exact():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))

  def net(x_in, labels):  # any network: the boundary condition must not depend on it
    return jnp.full_like(x_in, 123.0) + labels[:, None, None, None]

  out = karras.consistency_fn(net, x, jnp.full((3,), 0.002), NOISE)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  # ... and at the last point of every grid the curriculum uses (the teacher of i = N - 2).
  for n in (11, 21, 41, 81, 161, 321, 641):
    last = karras.karras_sigma(jnp.full((3,), n - 1), n, NOISE)
    assert np.all(np.asarray(last) == np.float32(0.002)), n
    out = karras.consistency_fn(net, x, last, NOISE)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_consistency_fn_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3, 3, 2))
  sigma = np.array([0.01, 0.5, 3.0, 80.0])

  def net(x_in, labels):
    return jnp.tanh(x_in) * labels[:, None, None, None] / 1000.0

  got = np.asarray(
    karras.consistency_fn(net, jnp.asarray(x, jnp.float32), jnp.asarray(sigma), NOISE)
  )
  s = sigma[:, None, None, None]
  c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
  c_out = 0.5 * (s - 0.002) / np.sqrt(s**2 + 0.25)
  c_in = 1 / np.sqrt(s**2 + 0.25)
  want = c_skip * x + c_out * np.tanh(c_in * x) * (250 * np.log(s)) / 1000.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---- section 2.2 ---------------------------------------------------------------------------------
def test_curriculum_stage_boundaries():
  total = PAPER.total_steps
  kp = total // 7
  assert PAPER.stage_length == kp == 109_200
  steps = [
    0,
    1,
    kp - 1,
    kp,
    2 * kp - 1,
    2 * kp,
    3 * kp,
    4 * kp,
    5 * kp,
    6 * kp - 1,
    6 * kp,
    total - 1,
    total,
    10 * total,
  ]
  got = [int(curriculum.num_scales(k, PAPER)) for k in steps]
  assert got == [np_n_of_k(k, total) for k in steps]
  assert sorted(set(got)) == [11, 21, 41, 81, 161, 321, 641]


@pytest.mark.parametrize("s0,s1,total", [(10, 1280, 400_000), (2, 8, 30), (10, 640, 294_000)])
def test_curriculum_other_settings(s0, s1, total):
  cfg = curriculum.CurriculumConfig(s0=s0, s1=s1, total_steps=total)
  ks = np.linspace(0, 1.2 * total, 97).astype(int)
  got = np.asarray(jax.vmap(lambda k: curriculum.num_scales(k, cfg))(jnp.asarray(ks)))
  np.testing.assert_array_equal(got, [np_n_of_k(int(k), total, s0, s1) for k in ks])


# ---- section 2.3 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [11, 21, 81, 641])
def test_interval_probabilities(n):
  logp = np.asarray(curriculum.interval_log_probs(jnp.asarray(n), PAPER), np.float64)
  assert logp.shape == (640,)
  assert np.all(np.isneginf(logp[n - 1 :]))
  # float32 sigmas leave ~1e-4 relative at N = 641. Plain erf differences in the low-noise tail
  # (erf near -1) would leave 2.4e-4 there; the erfc differences stay within the tolerance.
  np.testing.assert_allclose(np.exp(logp[: n - 1]), np_interval_probs(n), rtol=1.5e-4, atol=0)


def test_interval_sampling_frequencies():
  n = 21
  idx = np.asarray(
    curriculum.sample_intervals(jax.random.PRNGKey(1), jnp.asarray(n), 200_000, PAPER)
  )
  assert idx.min() >= 0 and idx.max() <= n - 2
  freq = np.bincount(idx, minlength=n - 1) / idx.size
  p = np_interval_probs(n)
  # 5 binomial standard deviations.
  assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / idx.size) + 1e-6)


# ---- section 3.2 ---------------------------------------------------------------------------------
def np_losses(r2, c):
  return dict(
    cauchy=np.log1p(r2 / (2 * c**2)),
    pseudo_huber=np.sqrt(r2 + c**2) - c,
    geman_mcclure=2 * r2 / (r2 + 4 * c**2),
    l2=r2,
  )


def np_loss_grads(r2, c):  # d/d r2, from docs/method.md §3.2
  return dict(
    cauchy=1 / (2 * c**2 + r2),
    pseudo_huber=1 / (2 * np.sqrt(r2 + c**2)),
    geman_mcclure=8 * c**2 / (r2 + 4 * c**2) ** 2,
    l2=np.ones_like(r2),
  )


@pytest.mark.parametrize("kind", curriculum.LOSSES)
@pytest.mark.parametrize("c", [0.03456, 0.000253])
def test_robust_losses_and_gradients(kind, c):
  r2 = np.geomspace(1e-8, 10.0, 41)
  got = np.asarray(losses.robust_distance(jnp.asarray(r2, jnp.float32), jnp.float32(c), kind))
  np.testing.assert_allclose(got, np_losses(r2, c)[kind], rtol=2e-5, atol=1e-7)
  grad = jax.vmap(jax.grad(lambda r: losses.robust_distance(r, jnp.float32(c), kind)))
  got_g = np.asarray(grad(jnp.asarray(r2, jnp.float32)))
  np.testing.assert_allclose(got_g, np_loss_grads(r2, c)[kind], rtol=2e-4)


def test_mean_form_residual_and_ct_loss():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 6, 8, 8, 4))
  s = np.array([80.0, 10.0, 1.0, 0.5, 0.1, 0.01])
  s_next = s * 0.9
  c = 0.0137
  r2 = ((a - b) ** 2).reshape(6, -1).mean(1)
  want = np.mean(np.log1p(r2 / (2 * c**2)) / (s - s_next))
  got = jnp.mean(
    losses.consistency_terms(*(jnp.asarray(v, jnp.float32) for v in (a, b, s, s_next)), c, "cauchy")
  )
  assert float(got) == pytest.approx(want, rel=1e-5)


# ---- section 3.3 ---------------------------------------------------------------------------------
def test_adaptive_c():
  ns = [11, 21, 41, 81, 161, 321, 641]
  got = [float(curriculum.scale_c(jnp.asarray(n), PAPER)) for n in ns]
  np.testing.assert_allclose(got, [np_c(n) for n in ns], rtol=1e-5)
  # The table of docs/method.md §3.3.
  np.testing.assert_allclose(
    got, [0.034560, 0.013635, 0.006144, 0.002769, 0.001248, 0.000562, 0.000253], rtol=2e-3
  )
  const = curriculum.CurriculumConfig(c_schedule="constant", c_constant=0.01)
  assert float(curriculum.scale_c(jnp.asarray(641), const)) == pytest.approx(0.01)


# ---- section 3.4 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [11, 21, 641])
def test_diffusion_mask_and_weight(n):
  i = jnp.arange(n - 1)
  mask = np.asarray(curriculum.diffusion_mask(i, jnp.asarray(n), PAPER))
  np.testing.assert_array_equal(mask, np.arange(n - 1) >= math.floor(0.75 * n))
  sigma = np.geomspace(0.002, 80, 9)
  w = np.asarray(curriculum.diffusion_weight(jnp.asarray(sigma, jnp.float32), PAPER))
  np.testing.assert_allclose(w, 1 / sigma**2 + 1 / 0.25, rtol=1e-5)


def test_diffusion_thresholds_and_fractions_of_method_md():
  rows = {r["N"]: r for r in curriculum.stage_table(PAPER)}
  assert rows[11]["diff_sigma_max"] == pytest.approx(np_sigmas(11)[8], rel=1e-5)
  assert rows[11]["diff_sigma_max"] == pytest.approx(0.0851, abs=1e-4)
  for n in (21, 41, 641):
    assert rows[n]["diff_sigma_max"] == pytest.approx(np_sigmas(n)[math.floor(0.75 * n)], rel=1e-5)
    assert rows[n]["diff_sigma_max"] == pytest.approx(0.1698, abs=1e-4)
  for n, frac in ((11, 0.244), (21, 0.366), (641, 0.366)):
    want = np_interval_probs(n)[math.floor(0.75 * n) :].sum()
    assert rows[n]["diff_fraction"] == pytest.approx(want, rel=1e-4)
    assert rows[n]["diff_fraction"] == pytest.approx(frac, abs=1.5e-3)


def test_masked_mean_including_empty_mask():
  rng = np.random.default_rng(3)
  v = rng.uniform(size=10)
  m = rng.uniform(size=10) > 0.5
  assert float(losses.masked_mean(jnp.asarray(v), jnp.asarray(m))) == pytest.approx(
    v[m].mean(), rel=1e-6
  )
  empty = losses.masked_mean(jnp.asarray(v), jnp.zeros(10, bool))
  assert float(empty) == 0.0
  # A non-finite value outside the mask does not leak into the mean.
  v[~m] = np.nan
  assert float(losses.masked_mean(jnp.asarray(v), jnp.asarray(m))) == pytest.approx(
    np.nanmean(v[m]), rel=1e-6
  )


def test_diffusion_loss_formula():
  rng = np.random.default_rng(4)
  y, x0 = rng.normal(size=(2, 5, 4, 4, 3))
  sigma = np.array([0.01, 0.1, 1.0, 0.05, 2.0])
  mask = np.array([True, True, False, True, False])
  w = 1 / sigma**2 + 4
  mse = ((y - x0) ** 2).reshape(5, -1).mean(1)
  want = (w * mse)[mask].mean()
  terms = losses.diffusion_terms(jnp.asarray(y), jnp.asarray(x0), jnp.asarray(w))
  got = losses.masked_mean(terms, jnp.asarray(mask))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_stage_table_covers_all_steps():
  rows = curriculum.stage_table(PAPER)
  assert rows[0]["start_step"] == 0 and rows[-1]["end_step"] == PAPER.total_steps - 1
  for a, b in zip(rows, rows[1:]):
    assert b["start_step"] == a["end_step"] + 1
  for r in rows:
    assert (
      np_n_of_k(r["start_step"], PAPER.total_steps)
      == r["N"]
      == np_n_of_k(r["end_step"], PAPER.total_steps)
    )
    assert r["c"] == pytest.approx(np_c(r["N"]), rel=1e-5)

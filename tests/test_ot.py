"""Tests for lct_jax.core.ot against scipy / float64 numpy, on 8 fake CPU devices."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lct_jax.core import ot

N_DEV = 8
# ott-jax imports jaxopt, which warns that it is unmaintained.
pytestmark = pytest.mark.filterwarnings("ignore:JAXopt is no longer maintained:DeprecationWarning")


def _mesh():
  return jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _cost64(x, n):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  n = np.asarray(n, np.float64).reshape(len(n), -1)
  return ((x[:, None, :] - n[None, :, :]) ** 2).sum(-1)


def _opt(x, n):
  """scipy optimum on the float64 cost: (perm, total cost)."""
  c = _cost64(x, n)
  rows, cols = scipy.optimize.linear_sum_assignment(c)
  perm = np.empty(len(x), np.int64)
  perm[rows] = cols
  return perm, c[rows, cols].sum()


def _total(x, n, perm):
  c = _cost64(x, n)
  return c[np.arange(len(x)), np.asarray(perm)].sum()


def _data(b, shape, seed):
  rng = np.random.default_rng(seed)
  x = (0.5 * rng.standard_normal((b, *shape)) + 0.1).astype(np.float32)
  n = rng.standard_normal((b, *shape)).astype(np.float32)
  return x, n


def _is_perm(p, b):
  p = np.asarray(p)
  return p.shape == (b,) and p.dtype == np.int32 and np.array_equal(np.sort(p), np.arange(b))


def _source_rows(out, noise):
  """Index of the input row each output row equals exactly (-1 if none)."""
  lookup = {r.tobytes(): i for i, r in enumerate(np.asarray(noise).reshape(len(noise), -1))}
  return np.array([lookup.get(r.tobytes(), -1) for r in np.asarray(out).reshape(len(out), -1)])


def test_cost_matrix_matches_float64():
  for shape, b, b2 in [((4, 32, 32), 16, 12), ((3,), 5, 7)]:
    x, _ = _data(b, shape, 0)
    _, n = _data(b2, shape, 1)
    got = np.asarray(jax.jit(ot.cost_matrix)(x, n))
    want = _cost64(x, n)
    assert got.shape == (b, b2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * want.max())
  # identical rows: exactly 0, never negative from rounding.
  x, _ = _data(8, (4096,), 2)
  assert np.asarray(ot.cost_matrix(x, x)).min() >= 0.0


@pytest.mark.parametrize("method", ["exact", "hungarian"])
@pytest.mark.parametrize("b,shape", [(16, (4, 32, 32)), (64, (4, 32, 32)), (64, (2,))])
def test_assignment_is_optimal(method, b, shape):
  x, n = _data(b, shape, seed=b + len(shape))
  fn = jax.jit(lambda a, c: ot.assignment(a, c, jax.random.key(0), config=ot.OTConfig(method)))
  perm = fn(x, n)
  assert _is_perm(perm, b)
  _, best = _opt(x, n)
  got = _total(x, n, perm)
  np.testing.assert_allclose(got, best, rtol=1e-9)
  assert got < _total(x, n, np.arange(b))


def test_exact_under_vmap():
  xs, ns = _data(3 * 12, (16,), 3)
  xs, ns = xs.reshape(3, 12, 16), ns.reshape(3, 12, 16)
  cfg = ot.OTConfig("exact")
  perms = jax.jit(jax.vmap(lambda a, c: ot.assignment(a, c, None, config=cfg)))(xs, ns)
  for i in range(3):
    np.testing.assert_array_equal(perms[i], _opt(xs[i], ns[i])[0])


def test_none_is_identity():
  x, n = _data(16, (4, 4), 4)
  cfg = ot.OTConfig("none")
  np.testing.assert_array_equal(ot.assignment(x, n, jax.random.key(0), config=cfg), np.arange(16))
  mesh = _mesh()
  sh = NamedSharding(mesh, P("data"))
  for scope in ot.SCOPES:
    c = ot.OTConfig("none", scope=scope)
    out = jax.jit(lambda a, b, k: ot.couple(a, b, k, config=c, mesh=mesh))(
      jax.device_put(x, sh), jax.device_put(n, sh), jax.random.key(0)
    )
    np.testing.assert_array_equal(out, n)


@pytest.mark.parametrize("method", ["exact", "hungarian", "sinkhorn"])
@pytest.mark.parametrize("scope", ot.SCOPES)
def test_couple_permutes_rows_under_jit(method, scope):
  b, shard = 64, 64 // N_DEV
  x, n = _data(b, (4, 8, 8), 5)
  mesh = _mesh()
  sh = NamedSharding(mesh, P("data"))
  cfg = ot.OTConfig(method, scope=scope)
  fn = jax.jit(lambda a, c, k: ot.couple(a, c, k, config=cfg, mesh=mesh))
  out = fn(jax.device_put(x, sh), jax.device_put(n, sh), jax.random.key(1))
  assert out.shape == n.shape and out.dtype == n.dtype
  assert out.sharding.is_equivalent_to(sh, out.ndim)
  src = _source_rows(out, n)
  assert np.array_equal(np.sort(src), np.arange(b)), "rows must be permuted, not resampled"
  if scope == "local":
    assert np.array_equal(src // shard, np.arange(b) // shard), "a row left its shard"
  assert _total(x, n, src) < _total(x, n, np.arange(b))


@pytest.mark.parametrize("method", ["exact", "hungarian"])
def test_local_and_global_scope_optima(method):
  b, shard = 64, 64 // N_DEV
  x, n = _data(b, (4, 32, 32), 6)
  mesh = _mesh()
  sh = NamedSharding(mesh, P("data"))
  xs, ns, key = jax.device_put(x, sh), jax.device_put(n, sh), jax.random.key(0)
  outs = {}
  for scope in ot.SCOPES:
    cfg = ot.OTConfig(method, scope=scope)
    outs[scope] = np.asarray(
      jax.jit(lambda a, c, k: ot.couple(a, c, k, config=cfg, mesh=mesh))(xs, ns, key)
    )
  # local: each shard's own optimum, computed here shard by shard.
  local_src = []
  for s in range(N_DEV):
    sl = slice(s * shard, (s + 1) * shard)
    perm_s, _ = _opt(x[sl], n[sl])
    np.testing.assert_array_equal(outs["local"][sl], n[sl][perm_s])
    local_src.append(s * shard + perm_s)
  local_total = _total(x, n, np.concatenate(local_src))
  # global: the whole-batch optimum.
  perm_g, best_g = _opt(x, n)
  np.testing.assert_array_equal(outs["global"], n[perm_g])
  assert best_g <= local_total
  # the unsharded call (mesh None) agrees with global scope.
  cfg = ot.OTConfig(method, scope="local")
  np.testing.assert_array_equal(ot.couple(x, n, key, config=cfg, mesh=None), n[perm_g])


def test_sinkhorn_plan_marginals_and_determinism():
  b = 64
  x, n = _data(b, (4, 32, 32), 7)
  cfg = ot.OTConfig("sinkhorn", sinkhorn_epsilon=0.01, sinkhorn_iterations=200)
  log_plan, out = jax.jit(lambda a, c: ot.sinkhorn_log_plan(a, c, config=cfg))(x, n)
  plan = np.asarray(out.matrix, np.float64)
  # ott stops at an L1 marginal error of 1e-3; 200 iterations at epsilon = 0.01 std(cost) get the
  # last-updated (row) marginal exact and the column marginal to ~6e-3 in L1 (single columns to a
  # few %), which is ample for drawing a permutation.
  for axis in (0, 1):
    marg = plan.sum(axis)
    assert np.abs(marg - 1.0 / b).sum() < 1e-2
    np.testing.assert_allclose(marg, 1.0 / b, rtol=0.05)
  assert abs(plan.sum() - 1.0) < 1e-3
  # the log-plan used for sampling is the log of ott's plan.
  np.testing.assert_allclose(np.exp(np.asarray(log_plan, np.float64)), plan, atol=1e-4 / b)
  fn = jax.jit(lambda a, c, k: ot.assignment(a, c, k, config=cfg))
  p1, p2 = fn(x, n, jax.random.key(3)), fn(x, n, jax.random.key(3))
  assert _is_perm(p1, b)
  np.testing.assert_array_equal(p1, p2)
  # it captures most of exact OT's improvement over the identity even at D = 4096.
  _, best = _opt(x, n)
  ident = _total(x, n, np.arange(b))
  assert _total(x, n, p1) - best < 0.25 * (ident - best)


def test_sinkhorn_near_optimal_on_easy_instance():
  b = 64
  rng = np.random.default_rng(8)
  x = (3.0 * rng.standard_normal((b, 8))).astype(np.float32)
  hidden = rng.permutation(b)
  n = np.empty_like(x)
  n[hidden] = x + 0.3 * rng.standard_normal((b, 8)).astype(np.float32)  # x[b] ~ n[hidden[b]]
  perm_opt, best = _opt(x, n)
  cfg = ot.OTConfig("sinkhorn", sinkhorn_epsilon=0.01)
  perm = jax.jit(lambda a, c, k: ot.assignment(a, c, k, config=cfg))(x, n, jax.random.key(0))
  assert _is_perm(perm, b)
  assert _total(x, n, perm) <= 1.03 * best
  assert np.mean(np.asarray(perm) == perm_opt) >= 0.9


def _sequential_draw_probs(plan, orders):
  """Exact law of the permutation when rows, in a uniformly random order from ``orders``, each
  take an unused column with probability proportional to the plan (float64 enumeration)."""
  b = len(plan)
  probs = {}
  for order in orders:
    for cols in itertools.permutations(range(b)):
      pr, free = 1.0 / len(orders), set(range(b))
      for row, col in zip(order, cols):
        pr *= plan[row, col] / sum(plan[row, c] for c in free)
        free.remove(col)
      perm = [0] * b
      for row, col in zip(order, cols):
        perm[row] = col
      probs[tuple(perm)] = probs.get(tuple(perm), 0.0) + pr
  return probs


def test_sample_permutation_probabilities():
  plan = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])  # rows 0, 1 compete
  want = _sequential_draw_probs(plan, list(itertools.permutations(range(3))))
  fixed_order = _sequential_draw_probs(plan, [(0, 1, 2)])
  assert max(abs(want[k] - fixed_order[k]) for k in want) > 0.1  # the test sees the row order
  keys = jax.random.split(jax.random.key(0), 3000)
  log_plan = jnp.log(jnp.asarray(plan, jnp.float32))
  perms = np.asarray(jax.jit(jax.vmap(lambda k: ot.sample_permutation(log_plan, k)))(keys))
  assert all(_is_perm(p, 3) for p in perms)
  for k, pr in want.items():
    freq = np.mean(np.all(perms == np.array(k), axis=1))
    assert abs(freq - pr) < 0.04, (k, freq, pr)  # >= 4.4 sigma at 3000 draws
  # a hard plan (one permutation carrying all the mass) is recovered exactly.
  b = 32
  target = np.random.default_rng(0).permutation(b)
  hard = np.full((b, b), -1e4, np.float32)
  hard[np.arange(b), target] = 0.0
  np.testing.assert_array_equal(ot.sample_permutation(jnp.asarray(hard), jax.random.key(1)), target)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_still_gives_a_permutation(bad):
  # A diverged step must not crash or hang the coupling; the train step's NaN guard handles it.
  x, n = _data(8, (4,), 9)
  x[3, 1] = bad
  for method in ("exact", "hungarian", "sinkhorn"):
    cfg = ot.OTConfig(method)
    perm = jax.jit(lambda a, c, k: ot.assignment(a, c, k, config=cfg))(x, n, jax.random.key(0))
    assert _is_perm(perm, 8), method


def test_config_validation():
  with pytest.raises(ValueError, match="method"):
    ot.OTConfig("emd")
  with pytest.raises(ValueError, match="scope"):
    ot.OTConfig(scope="host")

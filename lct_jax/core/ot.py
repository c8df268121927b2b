"""Optimal-transport coupling of a data minibatch with a noise minibatch (docs/method.md §3.5).

This module owns the pairing step of the training recipe: given data latents ``x`` and standard
normal draws ``noise`` of the same shape, it finds a permutation ``perm`` of the noise rows that
(approximately) minimises ``sum_b ||x_b - noise_perm[b]||^2`` and returns ``noise[perm]``. The rows
of the noise are only permuted, never resampled, so each marginal stays exactly N(0, I).

Solvers (``OTConfig.method``):
  * ``exact``: ``scipy.optimize.linear_sum_assignment`` on the host via ``jax.pure_callback``
    (identical to the paper's exact EMD for uniform square marginals, ties aside).
  * ``hungarian``: ``optax.assignment.hungarian_algorithm``, jittable and on device.
  * ``sinkhorn``: an entropic plan from ott-jax, then a permutation drawn from the plan without
    replacement (Gumbel-max over the masked log-plan, rows in random order).
  * ``none``: the identity (no coupling).

Scope (``OTConfig.scope``): ``local`` couples each device's shard of the batch independently
(what the paper does per GPU, docs/method.md §9 item 15); ``global`` couples the whole batch.

ott-jax is imported lazily (only for ``sinkhorn``), so the other methods run on a box without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

METHODS = ("none", "exact", "hungarian", "sinkhorn")
SCOPES = ("local", "global")


@dataclasses.dataclass(frozen=True)
class OTConfig:
  """Static OT settings (hashable, safe to close over in a jitted step).

  Attributes:
    method: one of ``METHODS``.
    scope: one of ``SCOPES``.
    sinkhorn_epsilon: entropic regularisation relative to the cost spread:
      ``epsilon = sinkhorn_epsilon * std(cost matrix)``.
    sinkhorn_iterations: maximum number of Sinkhorn iterations.
  """

  method: str = "exact"
  scope: str = "local"
  sinkhorn_epsilon: float = 0.01
  sinkhorn_iterations: int = 200

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"ot.method must be one of {METHODS}, got {self.method!r}")
    if self.scope not in SCOPES:
      raise ValueError(f"ot.scope must be one of {SCOPES}, got {self.scope!r}")
    if not self.sinkhorn_epsilon > 0:
      raise ValueError(f"ot.sinkhorn_epsilon must be > 0, got {self.sinkhorn_epsilon}")
    if self.sinkhorn_iterations < 1:
      raise ValueError(f"ot.sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}")


def _flat32(a: jax.Array) -> jax.Array:
  return jnp.reshape(a, (a.shape[0], -1)).astype(jnp.float32)


def _cross(x: jax.Array, noise: jax.Array) -> jax.Array:
  # HIGHEST: on GPU/TPU the default f32 matmul uses TF32/bf16 passes. At D = 4096 their error in
  # <x, n> is large enough to flip near-tied pairs; HIGHEST keeps it far below the gaps.
  return jnp.matmul(_flat32(x), _flat32(noise).T, precision=jax.lax.Precision.HIGHEST)


def cost_matrix(x: jax.Array, noise: jax.Array) -> jax.Array:
  """Squared Euclidean distances between flattened rows.

  Args:
    x: (B, ...) data.
    noise: (B', ...) noise with the same trailing size as ``x``.

  Returns:
    (B, B') float32 matrix ``M[j, k] = ||x_j - noise_k||^2`` (clamped at 0 against rounding).
  """
  xf, nf = _flat32(x), _flat32(noise)
  xx = jnp.sum(xf * xf, axis=1)
  nn = jnp.sum(nf * nf, axis=1)
  return jnp.maximum(xx[:, None] + nn[None, :] - 2.0 * _cross(x, noise), 0.0)


def _assignment_cost(x: jax.Array, noise: jax.Array) -> jax.Array:
  """A cost with the same optimal permutations as ``cost_matrix`` but better conditioned.

  For a permutation, ``sum_b M[b, perm b] = sum ||x||^2 + sum ||n||^2 - 2 sum_b <x_b, n_perm b>``,
  so only the cross term matters. Dropping the norms (~5000 at D = 4096) keeps float32 rounding
  far below the gaps between assignments; subtracting each row's minimum makes it non-negative.
  """
  c = -_cross(x, noise)
  return c - jnp.min(c, axis=1, keepdims=True)


def exact_assignment_host(cost: np.ndarray) -> np.ndarray:
  """Host side of ``exact`` (scipy): one permutation per (B, B) matrix of ``cost`` (..., B, B).

  Also what the training loop calls from a host thread for the one-step-ahead global coupling
  (``lct_jax.io.coupling.HostCoupledBatches``). A non-finite matrix gives the identity.
  """
  cost = np.asarray(cost, dtype=np.float64)
  b = cost.shape[-1]
  flat = cost.reshape((-1, b, b))
  out = np.empty(flat.shape[:2], dtype=np.int32)
  for i, c in enumerate(flat):
    if not np.all(np.isfinite(c)):
      out[i] = np.arange(b, dtype=np.int32)  # let the train step's NaN guard handle it; no crash
      continue
    rows, cols = scipy.optimize.linear_sum_assignment(c)
    out[i, rows] = cols
  return out.reshape(cost.shape[:-1])


def _exact_perm(cost: jax.Array) -> jax.Array:
  shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  # expand_dims: under vmap the callback receives the whole stacked batch once (one host call).
  return jax.pure_callback(exact_assignment_host, shape, cost, vmap_method="expand_dims")


def _hungarian_perm(cost: jax.Array) -> jax.Array:
  b = cost.shape[0]
  # A non-finite cost (a diverged step) gives the identity, as in ``exact``, rather than relying
  # on the solver's loops to terminate on NaN comparisons.
  finite = jnp.all(jnp.isfinite(cost))
  rows, cols = optax.assignment.hungarian_algorithm(jnp.where(finite, cost, 0.0))
  perm = jnp.zeros((b,), jnp.int32).at[rows].set(cols.astype(jnp.int32))
  return jnp.where(finite, perm, jnp.arange(b, dtype=jnp.int32))


def _sinkhorn_from_cost(cost: jax.Array, config: OTConfig) -> tuple[jax.Array, Any]:
  from ott.geometry import geometry  # lazy: ott-jax is optional for the other methods
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  eps = config.sinkhorn_epsilon * jnp.maximum(jnp.std(cost), 1e-12)
  geom = geometry.Geometry(cost_matrix=cost, epsilon=eps)
  solver = sinkhorn.Sinkhorn(max_iterations=config.sinkhorn_iterations)
  out = solver(linear_problem.LinearProblem(geom))
  # Log-plan from the potentials (ott's plan is exp((f_i + g_j - C_ij) / eps)): finite even where
  # the plan itself underflows to 0 in float32.
  log_plan = (out.f[:, None] + out.g[None, :] - cost) / eps
  return log_plan, out


def sinkhorn_log_plan(x: jax.Array, noise: jax.Array, *, config: OTConfig) -> tuple[jax.Array, Any]:
  """Entropic OT plan between the uniform empirical measures of ``x`` and ``noise`` (ott-jax).

  Args:
    x: (B, ...) data.
    noise: (B, ...) noise.
    config: uses ``sinkhorn_epsilon`` (relative to std of the cost) and ``sinkhorn_iterations``.

  Returns:
    ``(log_plan, out)``: the (B, B) log of the plan computed from the potentials and the ott
    ``SinkhornOutput`` (``out.matrix`` is the plan; rows and columns sum to 1/B at convergence).
  """
  return _sinkhorn_from_cost(cost_matrix(x, noise), config)


def sample_permutation(log_plan: jax.Array, key: jax.Array) -> jax.Array:
  """Draws a permutation from a (B, B) plan without replacement.

  Rows are visited in a random order; each row picks one still-unused column with probability
  proportional to its plan entries (Gumbel-max over the masked log-plan).

  Args:
    log_plan: (B, B) log of a non-negative plan (any per-row normalisation).
    key: PRNG key.

  Returns:
    (B,) int32 permutation ``perm`` with row ``b`` paired to column ``perm[b]``.
  """
  b = log_plan.shape[0]
  order_key, gumbel_key = jax.random.split(key)
  order = jax.random.permutation(order_key, b)
  gumbel = jax.random.gumbel(gumbel_key, (b, b), jnp.float32)
  # Non-finite entries (a diverged solve) become very unlikely but still valid choices.
  logits = jnp.nan_to_num(log_plan.astype(jnp.float32), nan=-1e30, posinf=1e30, neginf=-1e30)

  def body(t, carry):
    perm, used = carry
    row = order[t]
    scores = jnp.where(used, -jnp.inf, logits[row] + gumbel[row])
    col = jnp.argmax(scores).astype(jnp.int32)
    return perm.at[row].set(col), used.at[col].set(True)

  init = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.bool_))
  perm, _ = jax.lax.fori_loop(0, b, body, init)
  return perm


def method_cost(x: jax.Array, noise: jax.Array, config: OTConfig) -> jax.Array:
  """The (B, B) matrix the configured solver works on (``exact``: ``_assignment_cost``)."""
  if x.shape[0] != noise.shape[0]:
    raise ValueError(f"x and noise batch sizes differ: {x.shape[0]} vs {noise.shape[0]}")
  if config.method == "sinkhorn":
    return cost_matrix(x, noise)  # epsilon is defined relative to the true cost's spread
  return _assignment_cost(x, noise)


def _perm_from_cost(cost: jax.Array, key: jax.Array, config: OTConfig) -> jax.Array:
  b = cost.shape[0]
  if config.method == "none" or b == 1:
    return jnp.arange(b, dtype=jnp.int32)
  if config.method == "exact":
    return _exact_perm(cost)
  if config.method == "hungarian":
    return _hungarian_perm(cost)
  if config.method == "sinkhorn":
    return sample_permutation(_sinkhorn_from_cost(cost, config)[0], key)
  raise ValueError(f"unknown OT method {config.method!r}")


def assignment(x: jax.Array, noise: jax.Array, key: jax.Array, *, config: OTConfig) -> jax.Array:
  """Couples unsharded minibatches.

  Args:
    x: (B, ...) data latents.
    noise: (B, ...) noise of the same shape.
    key: PRNG key (used by ``sinkhorn`` only).
    config: the OT settings (``scope`` is ignored here: the arrays are coupled as given).

  Returns:
    (B,) int32 permutation ``perm``: ``(x[b], noise[perm[b]])`` are the coupled pairs.
  """
  if config.method == "none":
    return jnp.arange(x.shape[0], dtype=jnp.int32)
  return _perm_from_cost(method_cost(x, noise, config), key, config)


def _couple_unsharded(x: jax.Array, noise: jax.Array, key: jax.Array, config: OTConfig):
  perm = assignment(x, noise, key, config=config)
  return jnp.take(noise, perm, axis=0)


def _batch_axes(mesh, data_axis) -> tuple[Any, int]:
  """The batch's mesh axes (a name or a tuple of names) and how many shards they make."""
  if mesh is None:
    return data_axis, 1
  if data_axis is None:
    data_axis = tuple(mesh.axis_names)
  names = data_axis if isinstance(data_axis, tuple) else (data_axis,)
  return data_axis, int(np.prod([mesh.shape[a] for a in names]))


def couple(
  x: jax.Array,
  noise: jax.Array,
  key: jax.Array,
  *,
  config: OTConfig,
  mesh: jax.sharding.Mesh | None,
  data_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
  """Permutes the noise rows to pair them with the data rows (call inside the jitted step).

  Args:
    x: (B, ...) global data batch, sharded along axis 0 over ``data_axis`` of ``mesh``.
    noise: (B, ...) global noise batch with the same shape and sharding.
    key: PRNG key (replicated).
    config: the OT settings.
    mesh: the device mesh (axes of type Auto), or None for an unsharded (single-device) call.
    data_axis: the mesh axis or axes the batch is sharded over; None: all axes of ``mesh``.

  Returns:
    ``noise[perm]`` with the shape and batch sharding of ``noise``: the same rows, reordered.
    With ``scope="local"`` each device's shard is coupled on its own, so every output row comes
    from the same shard of the input; with ``scope="global"`` any row may move anywhere.
  """
  if config.method == "none":
    return noise
  data_axis, n_shards = _batch_axes(mesh, data_axis)
  if n_shards == 1:
    return _couple_unsharded(x, noise, key, config)
  spec = P(data_axis)
  # check_vma=False below: optax's Hungarian and ott's Sinkhorn build loops whose carries start
  # device-invariant and become device-varying, which the varying-manual-axes check rejects.
  if config.scope == "global":
    # The B x B matmul is partitioned by XLA; the small matrix is then replicated and every device
    # runs the same deterministic solve (for "exact": the same scipy call on its host). Left to
    # the partitioner, the solver loops would be sharded with a collective per iteration (5x
    # slower for Sinkhorn at B = 64 on 8 CPU devices), and a lone callback would sit on device 0.
    cost = jax.lax.with_sharding_constraint(method_cost(x, noise, config), NamedSharding(mesh, P()))
    solve = lambda c, k: _perm_from_cost(c, k, config)  # noqa: E731
    perm = jax.shard_map(solve, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)(
      cost, key
    )
    return apply_permutation(noise, perm, config=config, mesh=mesh, data_axis=data_axis)

  def local(xs, ns, k):
    k = jax.random.fold_in(k, jax.lax.axis_index(data_axis))
    return _couple_unsharded(xs, ns, k, config)

  return jax.shard_map(
    local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=spec, check_vma=False
  )(x, noise, key)


def apply_permutation(
  noise: jax.Array,
  perm: jax.Array,
  *,
  config: OTConfig,
  mesh: jax.sharding.Mesh | None,
  data_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
  """``noise[perm]`` for a coupling solved outside the step (call inside the jitted step).

  Args:
    noise: (B, ...) global noise batch, sharded along axis 0 over ``data_axis``.
    perm: (B,) int32 with the same sharding. ``scope="global"``: indices into the whole batch.
      ``scope="local"``: each shard's rows hold indices into that shard (0 .. B/S - 1), as
      ``couple`` finds them per device; they are applied shard by shard, without moving noise
      between devices.
    config: the OT settings (for ``scope``).
    mesh: the device mesh, or None for an unsharded call.
    data_axis: the mesh axis or axes the batch is sharded over; None: all axes of ``mesh``.

  Returns:
    The permuted noise, sharded like ``noise``.
  """
  data_axis, n_shards = _batch_axes(mesh, data_axis)
  if n_shards == 1 or config.scope == "global":
    out = jnp.take(noise, perm, axis=0)
    return (
      out
      if mesh is None
      else jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(data_axis)))
    )
  spec = P(data_axis)
  take = lambda n, p: jnp.take(n, p, axis=0)  # noqa: E731
  return jax.shard_map(take, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(noise, perm)

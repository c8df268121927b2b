"""Improved precision and recall (Kynkäänniemi et al. 2019) on feature vectors, in JAX, chunked.

Each set's manifold is the union of balls around its points. A ball's radius is the distance to
the point's k-th nearest neighbour within the set (k = 3 in the paper's protocol). The point
itself is not counted: the radius is the (k+1)-th smallest distance including the zero to itself,
as the StyleGAN2-ADA toolbox computes it.

Precision is the fraction of generated points inside the real manifold; recall the fraction of
real points inside the generated manifold. A point on a ball's boundary is inside.

Distances are computed block by block (`row_batch` x `col_batch`, 10,000 x 10,000 by default as
in the paper's toolbox), so 50k x 50k never materialises. Each block is one jitted matmul
(float32, highest precision) plus a running top-k or an any().
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 3
DEFAULT_BATCH = 10_000


def _sq_distances(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """Squared Euclidean distances (R, C) via |a|² - 2ab + |b|², clamped at 0."""
  dots = jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
  rn = jnp.sum(rows * rows, axis=1)
  cn = jnp.sum(cols * cols, axis=1)
  return jnp.maximum(rn[:, None] - 2.0 * dots + cn[None, :], 0.0)


@functools.partial(jax.jit, static_argnames=("num",))
def _smallest_update(
  best: jax.Array, rows: jax.Array, cols: jax.Array, col_valid: jax.Array, num: int
) -> jax.Array:
  """Merges one column block into the running `num` smallest squared distances per row."""
  d = jnp.where(col_valid[None, :], _sq_distances(rows, cols), jnp.inf)
  neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), num)
  return -neg


@jax.jit
def _covered_update(
  covered: jax.Array, rows: jax.Array, cols: jax.Array, col_radii_sq: jax.Array
) -> jax.Array:
  """ORs in whether each row lies within some column's ball (padded columns have radius -inf)."""
  inside = _sq_distances(rows, cols) <= col_radii_sq[None, :]
  return covered | jnp.any(inside, axis=1)


def _blocks(x: np.ndarray, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits (N, d) into blocks of `size` rows, zero-padding the last; with validity masks."""
  blocks, valid = [], []
  for start in range(0, len(x), size):
    chunk = x[start : start + size]
    n = len(chunk)
    mask = np.arange(size) < n
    if n < size:
      chunk = np.concatenate([chunk, np.zeros((size - n, x.shape[1]), x.dtype)])
    blocks.append(chunk)
    valid.append(mask)
  return blocks, valid


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"{name}: expected a non-empty (N, d) feature array, got shape {x.shape}")
  return x


def _knn_radii_sq(x: np.ndarray, k: int, row_batch: int, col_batch: int) -> np.ndarray:
  """Squared distance of each row of x to its k-th nearest other row, float32 (N,)."""
  if len(x) <= k:
    raise ValueError(f"need more than k={k} points, got {len(x)}")
  rb, cb = min(row_batch, len(x)), min(col_batch, len(x))
  row_blocks, _ = _blocks(x, rb)
  col_blocks, col_valid = _blocks(x, cb)
  out = []
  for rows in row_blocks:
    best = jnp.full((rb, k + 1), jnp.inf, jnp.float32)
    for cols, valid in zip(col_blocks, col_valid):
      best = _smallest_update(best, rows, cols, valid, num=k + 1)
    out.append(np.asarray(best[:, k]))
  return np.concatenate(out)[: len(x)]


def _coverage_sq(
  q: np.ndarray, r: np.ndarray, radii_sq: np.ndarray, row_batch: int, col_batch: int
) -> np.ndarray:
  """Whether each row of q is within squared distance radii_sq[j] of some r[j], bool (Q,)."""
  rb, cb = min(row_batch, len(q)), min(col_batch, len(r))
  row_blocks, _ = _blocks(q, rb)
  col_blocks, col_valid = _blocks(r, cb)
  radii_blocks = []
  for i, valid in enumerate(col_valid):
    rad = np.full((cb,), -np.inf, np.float32)
    rad[valid] = radii_sq[i * cb : i * cb + int(valid.sum())]
    radii_blocks.append(rad)
  out = []
  for rows in row_blocks:
    covered = jnp.zeros((rb,), bool)
    for cols, rad in zip(col_blocks, radii_blocks):
      covered = _covered_update(covered, rows, cols, rad)
    out.append(np.asarray(covered))
  return np.concatenate(out)[: len(q)]


def knn_radii(
  features: np.ndarray,
  k: int = DEFAULT_K,
  row_batch: int = DEFAULT_BATCH,
  col_batch: int = DEFAULT_BATCH,
) -> np.ndarray:
  """Distance from each point to its k-th nearest neighbour within the same set.

  Args:
    features: (N, d) with N > k.
    k: neighbour rank (the point itself excluded).
    row_batch, col_batch: block sizes of the distance computation.

  Returns:
    float32 (N,) radii (Euclidean, not squared).
  """
  x = _as_features(features, "features")
  return np.sqrt(_knn_radii_sq(x, k, row_batch, col_batch))


def manifold_coverage(
  queries: np.ndarray,
  refs: np.ndarray,
  ref_radii: np.ndarray,
  row_batch: int = DEFAULT_BATCH,
  col_batch: int = DEFAULT_BATCH,
) -> np.ndarray:
  """Whether each query lies in the union of closed balls B(refs[j], ref_radii[j]).

  Args:
    queries: (Q, d).
    refs: (R, d).
    ref_radii: (R,) Euclidean radii.
    row_batch, col_batch: block sizes (queries x refs).

  Returns:
    bool (Q,).
  """
  q = _as_features(queries, "queries")
  r = _as_features(refs, "refs")
  radii = np.asarray(ref_radii, np.float32)
  if radii.shape != (len(r),):
    raise ValueError(f"ref_radii must have shape ({len(r)},), got {radii.shape}")
  return _coverage_sq(q, r, radii * radii, row_batch, col_batch)


def precision_recall(
  real_features: np.ndarray,
  fake_features: np.ndarray,
  k: int = DEFAULT_K,
  row_batch: int = DEFAULT_BATCH,
  col_batch: int = DEFAULT_BATCH,
) -> dict[str, float]:
  """Improved precision and recall of generated features against real ones.

  Radii stay squared throughout, so a point exactly on a ball's boundary counts as inside.

  Args:
    real_features: (N_real, d), e.g. Inception pool3 or VGG16 features of real images.
    fake_features: (N_fake, d) of generated images.
    k: neighbourhood size (3 in the paper).
    row_batch, col_batch: block sizes of every distance computation.

  Returns:
    {"precision": fraction of fake points in the real manifold,
     "recall": fraction of real points in the fake manifold}.
  """
  real = _as_features(real_features, "real_features")
  fake = _as_features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
  real_radii_sq = _knn_radii_sq(real, k, row_batch, col_batch)
  fake_radii_sq = _knn_radii_sq(fake, k, row_batch, col_batch)
  precision = _coverage_sq(fake, real, real_radii_sq, row_batch, col_batch).mean()
  recall = _coverage_sq(real, fake, fake_radii_sq, row_batch, col_batch).mean()
  return {"precision": float(precision), "recall": float(recall)}

"""The paper network's 3x3 convolutions in other formulations: `python -m benchmarks.conv_forms`.

Times XLA's own convolution against Winograd's minimal filtering F(2x2, 3x3) and F(4x4, 3x3)
(Lavin & Gray, arXiv 1509.09308), written as a batched matrix product between two linear
transforms. It does so for each distinct 3x3 convolution shape of the paper network
(configs/ffhq.py at `--batch_size`, found by walking the network's jaxpr).

Winograd does 2.25x (F2) and 4x (F4) fewer multiplications than the direct convolution; whether
that wins depends on how fast the backend runs the batched product and the transforms.

Output, as JSON lines:

* per shape and form: forward and forward + backward (one vjp) seconds, min of `--repeats`, and
  the error against a float64 numpy convolution;
* per shape: the time of each Winograd stage of the forward (input transform, batched product,
  output transform);
* a last line weighting each form by how often each shape occurs in the network (the student's
  forward + backward and the teacher's forward).

A measurement only: the network uses `lax.conv_general_dilated` on every backend
(benchmarks/NOTES.md).
"""

import collections
import json
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import ffhq
from lct_jax import config_lib

_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size of the network whose shapes are used.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per form (min is reported).")


def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B^T, G, A^T) of F(m x m, 3 x 3) for m in (2, 4); interpolation points 0, +-1(, +-2), inf."""
  if m == 2:
    bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
    at = [[1, 1, 1, 0], [0, 1, -1, -1]]
  elif m == 4:
    bt = [
      [4, 0, -5, 0, 1, 0],
      [0, -4, -4, 1, 1, 0],
      [0, 4, -4, -1, 1, 0],
      [0, -2, -1, 2, 1, 0],
      [0, 2, -1, -2, 1, 0],
      [0, 4, 0, -5, 0, 1],
    ]
    g = [
      [1 / 4, 0, 0],
      [-1 / 6, -1 / 6, -1 / 6],
      [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6],
      [1 / 24, -1 / 12, 1 / 6],
      [0, 0, 1],
    ]
    at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
  else:
    raise ValueError(f"Winograd F(m, 3) is written for m in (2, 4), got {m}")
  return np.array(bt, np.float64), np.array(g, np.float64), np.array(at, np.float64)


def _combine(coefs, arrays):
  """sum_k coefs[k] * arrays[k], skipping zeros and multiplying only where |coef| != 1."""
  out = None
  for c, a in zip(coefs, arrays):
    if c == 0:
      continue
    term = a if c == 1 else -a if c == -1 else a * np.float32(c)
    out = term if out is None else out + term
  return out


def winograd_input(x: jax.Array, m: int) -> jax.Array:
  """B^T d B of every (m+2)^2 input tile (stride m) of NHWC x padded by 1: ((m+2)^2, tiles, C)."""
  bt, _, _ = winograd_matrices(m)
  a = m + 2
  b, h, wd, c = x.shape
  th, tw = -(-h // m), -(-wd // m)
  xp = jnp.pad(x, ((0, 0), (1, th * m - h + 1), (1, tw * m - wd + 1), (0, 0)))

  def transform(y, axis, tiles):
    rows = [jax.lax.slice_in_dim(y, i, i + m * (tiles - 1) + 1, m, axis) for i in range(a)]
    return [_combine(bt[k], rows) for k in range(a)]

  v = [col for row in transform(xp, 1, th) for col in transform(row, 2, tw)]
  return jnp.stack(v, 0).reshape(a * a, b * th * tw, c)


def winograd_product(v: jax.Array, w: jax.Array, m: int) -> jax.Array:
  """The batched product of the transformed input with the transformed HWIO kernel G g G^T."""
  _, g, _ = winograd_matrices(m)
  a = m + 2
  u = jnp.einsum("ai,ijco->ajco", g.astype(np.float32), w)
  u = jnp.einsum("bj,ajco->abco", g.astype(np.float32), u).reshape(a * a, *w.shape[2:])
  return jnp.einsum("tnc,tco->tno", v, u)


def winograd_output(prod: jax.Array, shape: tuple[int, ...], m: int) -> jax.Array:
  """A^T M A of every tile, assembled into the (B, H, W, O) output."""
  _, _, at = winograd_matrices(m)
  a = m + 2
  b, h, wd = shape[:3]
  th, tw = -(-h // m), -(-wd // m)
  prod = prod.reshape(a, a, b, th, tw, -1)
  rows = [_combine(at[r], [prod[k] for k in range(a)]) for r in range(m)]
  out = [[_combine(at[s], [row[k] for k in range(a)]) for s in range(m)] for row in rows]
  y = jnp.stack([jnp.stack(row, 3) for row in out], 2).reshape(b, th * m, tw * m, -1)
  return y[:, :h, :wd]


def winograd_conv(x: jax.Array, w: jax.Array, m: int) -> jax.Array:
  """'same' 3x3 stride-1 convolution of NHWC x with an HWIO kernel w by Winograd F(m x m, 3 x 3)."""
  return winograd_output(winograd_product(winograd_input(x, m), w, m), x.shape, m)


def xla_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def numpy_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """float64 'same' 3x3 convolution, the reference."""
  x, w = x.astype(np.float64), w.astype(np.float64)
  _, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = 0.0
  for i in range(3):
    for j in range(3):
      y = y + xp[:, i : i + h, j : j + wd] @ w[i, j]
  return y


def paper_conv_shapes(batch: int) -> collections.Counter:
  """{(B, H, W, Cin, Cout): count} of the 3x3 convolutions in one forward of the paper network."""
  config = ffhq.get_config()
  config.model.dtype = "float32"
  model = config_lib.build_model(config)
  h, w, c = config.data.latent_shape
  x = jnp.zeros((batch, h, w, c))
  labels = jnp.zeros((batch,))
  params = jax.eval_shape(
    lambda: model.init({"params": jax.random.PRNGKey(0)}, x, labels, train=False)
  )
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, labels, train=False))(params)
  shapes = collections.Counter()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        if rhs[:2] == (3, 3):
          shapes[(*lhs, rhs[3])] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return shapes


def _min_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def main(argv):
  del argv
  forms = {
    "xla": xla_conv,
    "winograd_f2": lambda x, w: winograd_conv(x, w, 2),
    "winograd_f4": lambda x, w: winograd_conv(x, w, 4),
  }
  shapes = paper_conv_shapes(_BATCH.value)
  totals = collections.defaultdict(float)
  reps = _REPEATS.value
  for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][1]):
    b, h, wd, c, o = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, wd, c)).astype(np.float32)
    w = (rng.standard_normal((3, 3, c, o)) / np.sqrt(9 * c)).astype(np.float32)
    g = rng.standard_normal((b, h, wd, o)).astype(np.float32)
    ref = numpy_conv(x, w)
    for name, fn in forms.items():
      forward = jax.jit(fn)

      @jax.jit
      def forward_backward(x, w, g, fn=fn):
        y, vjp = jax.vjp(fn, x, w)
        return y, vjp(g)

      err = float(np.max(np.abs(np.asarray(forward(x, w), np.float64) - ref)) / np.max(np.abs(ref)))
      t_fwd = _min_time(forward, (x, w), _REPEATS.value)
      t_fb = _min_time(forward_backward, (x, w, g), _REPEATS.value)
      # The step runs each layer's student forward + backward and the teacher's forward.
      totals[name] += count * (t_fb + t_fwd)
      flops = 2 * b * h * wd * c * o * 9
      line = dict(
        benchmark="conv_forms",
        form=name,
        shape_bhwio=list(shape),
        count_in_network=count,
        forward_s=t_fwd,
        forward_backward_s=t_fb,
        direct_gflop_per_s_forward=flops / t_fwd / 1e9,
        max_rel_error_vs_float64=err,
        backend=jax.default_backend(),
      )
      print(json.dumps(line), flush=True)
    for m in (2, 4):  # where Winograd's forward time goes
      v = jax.jit(winograd_input, static_argnums=1)(x, m)
      prod = jax.jit(winograd_product, static_argnums=2)(v, w, m)
      parts = dict(
        input_transform_s=_min_time(jax.jit(winograd_input, static_argnums=1), (x, m), reps),
        batched_product_s=_min_time(jax.jit(winograd_product, static_argnums=2), (v, w, m), reps),
        output_transform_s=_min_time(
          jax.jit(winograd_output, static_argnums=(1, 2)), (prod, x.shape, m), reps
        ),
      )
      product_flops = 2 * np.prod(v.shape) * o
      line = dict(
        benchmark="conv_forms_winograd_parts",
        form=f"winograd_f{m}",
        shape_bhwio=list(shape),
        **parts,
        batched_product_gflop_per_s=product_flops / parts["batched_product_s"] / 1e9,
        backend=jax.default_backend(),
      )
      print(json.dumps(line), flush=True)
  print(
    json.dumps(
      dict(
        benchmark="conv_forms_step_total",
        batch_size=_BATCH.value,
        seconds_per_step={k: round(v, 4) for k, v in totals.items()},
        backend=jax.default_backend(),
      )
    ),
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)

"""Accelerator-only correctness checks: `python -m benchmarks.gpu_checks` (one JSON line each).

The CPU test suite cannot reach the paths that exist only on a GPU: cuDNN's fused attention
(`model.attention=cudnn`, what `auto` picks in bfloat16 on a GPU) and XLA's GPU kernels for the
one-pass normalisation. Each check compares against a float64 numpy computation of the same
function on fresh random inputs (relative L2 error; bf16 operands land between 1e-3 and 1e-2):
* attention forward and its gradient, cudnn and xla implementations, bfloat16, at the paper
  network's 16x16 (256 tokens, 4 heads of 64) and 8x8 (64 tokens, 6 heads) shapes;
* `layers.normalize` (GroupNorm groups and the NsLN single group) with a mean far from zero.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lct_jax.core.models import layers


def np_attention(qkv: np.ndarray, heads: int) -> np.ndarray:
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  t = qkv.reshape(b, h * w, heads, c // heads, 3)
  q, k, v = t[..., 0], t[..., 1], t[..., 2]
  logits = np.einsum("bqnc,bknc->bnqk", q, k) / np.sqrt(c // heads)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknc->bqnc", p, v).reshape(b, h, w, c)


def np_attention_grad(qkv: np.ndarray, r: np.ndarray, heads: int, eps: float = 1e-4) -> np.ndarray:
  """d sum(r * attention(qkv)) / d qkv by the closed-form softmax-attention backward pass."""
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  ch = c // heads
  t = qkv.reshape(b, h * w, heads, ch, 3)
  q, k, v = t[..., 0], t[..., 1], t[..., 2]
  s = np.einsum("bqnc,bknc->bnqk", q, k) / np.sqrt(ch)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  do = r.reshape(b, h * w, heads, ch)
  dv = np.einsum("bnqk,bqnc->bknc", p, do)
  dp = np.einsum("bqnc,bknc->bnqk", do, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(ch)
  dq = np.einsum("bnqk,bknc->bqnc", ds, k)
  dk = np.einsum("bnqk,bqnc->bknc", ds, q)
  return np.stack([dq, dk, dv], axis=-1).reshape(qkv.shape)


def rel(a, ref) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def check_attention(impl: str, res: int, channels: int, seed: int) -> dict:
  heads = channels // 64
  rng = np.random.default_rng(seed)
  qkv = rng.normal(size=(16, res, res, 3 * channels))
  r = rng.normal(size=(16, res, res, channels))
  x = jnp.asarray(qkv, jnp.bfloat16)
  exact_in = np.asarray(x.astype(jnp.float32), np.float64)  # the bf16-rounded operands
  fn = jax.jit(lambda a: layers.attention_op(a, heads, impl))
  grad = jax.jit(
    jax.grad(lambda a: jnp.sum(fn(a).astype(jnp.float32) * jnp.asarray(r, jnp.float32)))
  )
  out, g = fn(x), grad(x)
  return {
    "check": f"attention_{impl}_{res}x{res}",
    "out_rel_err": rel(out, np_attention(exact_in, heads)),
    "grad_rel_err": rel(g, np_attention_grad(exact_in, r, heads)),
    "finite": bool(
      jnp.isfinite(out.astype(jnp.float32)).all() and jnp.isfinite(g.astype(jnp.float32)).all()
    ),
  }


def check_normalize(groups: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  x = 1000.0 + 0.05 * rng.normal(size=(8, 32, 32, 128)) + rng.normal(size=(8, 1, 1, 128))
  x = x.astype(np.float32)
  y = jax.jit(lambda a: layers.normalize(a, groups, 1e-5))(jnp.asarray(x))
  xs = np.asarray(x, np.float64).reshape(8, 32, 32, groups, 128 // groups)
  mu = xs.mean(axis=(1, 2, 4), keepdims=True)
  ref = ((xs - mu) / np.sqrt(((xs - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True) + 1e-5)).reshape(
    x.shape
  )
  return {"check": f"normalize_groups{groups}", "out_rel_err": rel(y, ref)}


def main() -> int:
  failed = False
  checks = [("normalize_groups32", lambda: check_normalize(32, 0))]
  checks.append(("normalize_groups1", lambda: check_normalize(1, 1)))
  for impl in ("xla", "cudnn"):
    for res, channels, seed in ((16, 256, 2), (8, 384, 3)):
      checks.append(
        (
          f"attention_{impl}_{res}x{res}",
          lambda i=impl, r=res, c=channels, s=seed: check_attention(i, r, c, s),
        )
      )
  for name, check in checks:
    try:
      row = check()
      ok = (
        row.get("finite", True) and row["out_rel_err"] < 1e-2 and row.get("grad_rel_err", 0) < 2e-2
      )
    except Exception as err:  # noqa: BLE001 - report and go on to the next check
      row, ok = {"check": name, "error": repr(err)[:500]}, False
    row.update(
      benchmark="gpu_check",
      ok=ok,
      backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind,
    )
    failed |= not ok
    sys.stdout.write(json.dumps(row) + "\n")
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())

"""Tests of lct_jax.core.models.dit: DiT (Peebles & Xie 2022) with adaLN-Zero blocks.

Numeric checks compare against an independent float64 numpy implementation written from the
paper's definitions (its own patchify, position embedding, sinusoid, LayerNorm, attention, GELU
and unpatchify, reading the Flax params by name), never against captured outputs. Parameter
counts come from a closed form per layer; the big sizes are only shape-evaluated.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lct_jax.core.models.dit import DIT_SIZES, PATCH_SIZES, DiT, DiTBlock, dit_size

TINY = dict(
  input_size=8,
  in_channels=3,
  out_channels=3,
  patch_size=2,
  hidden_size=32,
  depth=2,
  num_heads=4,
  num_classes=5,
)


def _inputs(cfg: dict, batch: int = 3, seed: int = 0):
  """Random (x, noise_labels, class_labels); c_noise = 250 ln sigma, sigma in [0.2, 5]."""
  rng = np.random.default_rng(seed)
  s = cfg["input_size"]
  x = rng.standard_normal((batch, s, s, cfg["in_channels"])).astype(np.float32)
  log_sigma = rng.uniform(np.log(0.2), np.log(5.0), batch)
  noise = (250.0 * log_sigma).astype(np.float32)
  k = cfg.get("num_classes", 0)
  labels = None if k == 0 else (np.arange(batch) * 2 % (k + 1)).astype(np.int32)
  return x, noise, labels


def _init(model: DiT, x, noise, labels):
  return model.init(jax.random.key(0), x, noise, labels, train=False)["params"]


def _randomize(params, seed: int = 1, scale: float = 0.2, only: str | None = None):
  """Every param leaf (or only those under top-level module `only`) -> scale * N(0, 1)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in sorted(flat.items()):
    if only is None or path[0] == only:
      leaf = jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)
    out[path] = leaf
  return flax.traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------------------------
# Independent float64 numpy reference.


def _np_params(params) -> dict:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def _np_linear(P, name, x):
  return x @ P[f"{name}/kernel"] + P[f"{name}/bias"]


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_layer_norm(x, eps=1e-6):
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def _np_pos_embed(grid, dim, swap_halves=False):
  """pe[r, s]: channels [0, D/2) sin-cos of the column s, [D/2, D) of the row r."""
  quarter = dim // 4
  pe = np.zeros((grid, grid, dim))
  for r in range(grid):
    for s in range(grid):
      first, second = (r, s) if swap_halves else (s, r)
      for k in range(quarter):
        omega = 1.0 / 10000.0 ** (k / quarter)
        pe[r, s, k] = math.sin(first * omega)
        pe[r, s, quarter + k] = math.cos(first * omega)
        pe[r, s, 2 * quarter + k] = math.sin(second * omega)
        pe[r, s, 3 * quarter + k] = math.cos(second * omega)
  return pe


def _np_attention(qkv, heads, layout="edm"):
  """qkv (B, T, 3D). layout 'edm': channel n*3*dh + 3*j + s; 'timm': s*D + n*dh + j."""
  b, t, d3 = qkv.shape
  d = d3 // 3
  dh = d // heads
  out = np.zeros((b, t, d))
  for n in range(heads):
    parts = []
    for s in range(3):
      if layout == "edm":
        idx = [n * 3 * dh + 3 * j + s for j in range(dh)]
      else:
        idx = [s * d + n * dh + j for j in range(dh)]
      parts.append(qkv[:, :, idx])
    q, k, v = parts
    logits = np.einsum("bqc,bkc->bqk", q, k) / math.sqrt(dh)
    logits = logits - logits.max(axis=-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(axis=-1, keepdims=True)
    out[:, :, n * dh : (n + 1) * dh] = np.einsum("bqk,bkc->bqc", w, v)
  return out


def np_dit(params, x, noise, labels, cfg, swap_pos_halves=False, qkv_layout="edm"):
  """DiT adaLN-Zero forward in float64 numpy, from the paper's definitions."""
  P = _np_params(params)
  x = np.asarray(x, np.float64)
  b, size, _, cin = x.shape
  p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
  cout = cfg["out_channels"]
  g = size // p

  # Patch embedding: token (r, s) sees pixels [r p, r p + p) x [s p, s p + p).
  kernel = P["x_embedder/kernel"]  # (p, p, Cin, D)
  tok = np.zeros((b, g, g, d))
  for r in range(g):
    for s in range(g):
      patch = x[:, r * p : (r + 1) * p, s * p : (s + 1) * p, :]
      tok[:, r, s] = np.einsum("bijc,ijcd->bd", patch, kernel) + P["x_embedder/bias"]
  tok = tok + _np_pos_embed(g, d, swap_pos_halves)[None]
  tok = tok.reshape(b, g * g, d)  # row-major token order

  # Noise embedding: EDM's [cos, sin] with f_k = 10000^(-k / 128), then the MLP.
  half = 128
  freqs = np.array([(1.0 / 10000.0) ** (k / half) for k in range(half)])
  arg = np.asarray(noise, np.float64)[:, None] * freqs[None]
  t = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
  c = _np_linear(P, "t_embedder_1", _np_silu(_np_linear(P, "t_embedder_0", t)))
  if cfg.get("num_classes", 0):
    c = c + P["y_embedder/embedding"][np.asarray(labels)]

  for i in range(cfg["depth"]):
    name = f"blocks_{i}"
    mod = _np_linear(P, f"{name}/adaLN_modulation", _np_silu(c))
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, None, k * d : (k + 1) * d] for k in range(6))
    h = _np_layer_norm(tok) * (1.0 + sc1) + sh1
    a = _np_attention(_np_linear(P, f"{name}/qkv", h), heads, qkv_layout)
    tok = tok + g1 * _np_linear(P, f"{name}/proj", a)
    h = _np_layer_norm(tok) * (1.0 + sc2) + sh2
    h = _np_linear(P, f"{name}/fc2", _np_gelu_tanh(_np_linear(P, f"{name}/fc1", h)))
    tok = tok + g2 * h

  mod = _np_linear(P, "final_layer/adaLN_modulation", _np_silu(c))
  shift, scale = mod[:, None, :d], mod[:, None, d:]
  out = _np_linear(P, "final_layer/linear", _np_layer_norm(tok) * (1.0 + scale) + shift)

  # Unpatchify: token (r, s) channel (i p + j) Cout + ch -> pixel (r p + i, s p + j), ch.
  img = np.zeros((b, size, size, cout))
  for r in range(g):
    for s in range(g):
      for i in range(p):
        for j in range(p):
          for ch in range(cout):
            img[:, r * p + i, s * p + j, ch] = out[:, r * g + s, (i * p + j) * cout + ch]
  return img


def _assert_close(got, ref, rtol=1e-4):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  scale = np.abs(ref).max()
  assert scale > 1e-2, "reference output is (near) zero: the comparison would prove nothing"
  err = np.abs(got - ref).max()
  assert err <= rtol * scale, f"max |err| {err:.3g} > {rtol} * max |ref| {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# 1. Parameter counts.


def closed_form_count(h, depth, p, cin, cout, num_classes, mlp_ratio=4.0):
  """DiT parameter count from the paper's layer definitions (excludes the fixed pos-embed)."""
  r = int(h * mlp_ratio)
  patch = p * p * cin * h + h
  noise = 256 * h + h + h * h + h
  labels = (num_classes + 1) * h if num_classes else 0
  attn = 3 * h * h + 3 * h + h * h + h
  mlp = h * r + r + r * h + h
  adaln = 6 * h * h + 6 * h
  final = 2 * h * h + 2 * h + h * p * p * cout + p * p * cout
  return patch + noise + labels + depth * (attn + mlp + adaln) + final


def shape_count(model: DiT, batch: int = 1) -> int:
  s, k = model.input_size, model.num_classes
  x = jax.ShapeDtypeStruct((batch, s, s, model.in_channels), jnp.float32)
  noise = jax.ShapeDtypeStruct((batch,), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if k else None
  init = functools.partial(model.init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), x, noise, labels)
  leaves = jax.tree_util.tree_leaves(shapes)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  return sum(math.prod(leaf.shape) for leaf in leaves)


@pytest.mark.parametrize("num_classes", [0, 1000])
@pytest.mark.parametrize("patch", PATCH_SIZES)
@pytest.mark.parametrize("size", list(DIT_SIZES))
def test_param_count_closed_form(size, patch, num_classes):
  h, depth, heads = DIT_SIZES[size]
  model = DiT(
    32, 4, 4, patch_size=patch, hidden_size=h, depth=depth, num_heads=heads, num_classes=num_classes
  )
  assert shape_count(model) == closed_form_count(h, depth, patch, 4, 4, num_classes)


def test_original_dit_xl2_count():
  """The DiT repository's DiT-XL/2 (in 4, out 8 learned sigma, 1000 classes) on a 32x32 latent.

  It prints 675,129,632: its label table has 1001 rows (as here) and, since it sums every
  `nn.Parameter`, it also counts the frozen (1, 256, 1152) pos-embed, a constant here.
  """
  model = DiT(32, 4, 8, num_classes=1000, **dit_size("DiT-XL/2"))
  ours = shape_count(model)
  assert ours == closed_form_count(1152, 28, 2, 4, 8, 1000) == 674_834_720
  pos_embed = (32 // 2) ** 2 * 1152
  assert ours + pos_embed == 675_129_632


# ------------------------------------------------------------------------------------------------
# 2. Forward against the numpy reference.


def test_forward_matches_numpy_reference():
  model = DiT(**TINY)
  x, noise, labels = _inputs(TINY)
  labels[-1] = TINY["num_classes"]  # the null row too
  params = _randomize(_init(model, x, noise, labels))
  got = jax.jit(functools.partial(model.apply, train=False))({"params": params}, x, noise, labels)
  assert got.dtype == jnp.float32 and got.shape == x.shape
  ref = np_dit(params, x, noise, labels, TINY)
  _assert_close(got, ref)
  # The comparison is sensitive to the documented layouts: other conventions do not match.
  for wrong in (dict(swap_pos_halves=True), dict(qkv_layout="timm")):
    other = np_dit(params, x, noise, labels, TINY, **wrong)
    assert np.abs(np.asarray(got) - other).max() > 1e-2 * np.abs(other).max(), wrong


def test_forward_unconditional_out_channels_patch4():
  cfg = dict(
    TINY,
    input_size=8,
    in_channels=2,
    out_channels=5,
    patch_size=4,
    num_classes=0,
    depth=1,
    mlp_ratio=2.0,
  )
  model = DiT(**cfg)
  x, noise, labels = _inputs(cfg, batch=2, seed=3)
  assert labels is None
  params = _randomize(_init(model, x, noise, None), seed=4)
  got = model.apply({"params": params}, x, noise, train=True)
  assert got.shape == (2, 8, 8, 5)
  _assert_close(got, np_dit(params, x, noise, None, cfg))


# ------------------------------------------------------------------------------------------------
# 3. adaLN-Zero.


def test_fresh_block_is_identity():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 32)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  block = DiTBlock(32, 4)
  variables = block.init(jax.random.key(1), x, c)
  out = block.apply(variables, x, c)
  assert np.array_equal(np.asarray(out), np.asarray(x))
  # ... and not because the branches are dead: with a non-zero modulation it is not.
  moved = block.apply({"params": _randomize(variables["params"])}, x, c)
  assert np.abs(np.asarray(moved) - np.asarray(x)).max() > 1e-2


def test_fresh_model_outputs_zero_until_final_layer_moves():
  model = DiT(**TINY)
  x, noise, labels = _inputs(TINY)
  params = _init(model, x, noise, labels)
  out = model.apply({"params": params}, x, noise, labels, train=False)
  assert np.array_equal(np.asarray(out), np.zeros(x.shape))
  moved = _randomize(params, only="final_layer")
  out = model.apply({"params": moved}, x, noise, labels, train=False)
  assert np.abs(np.asarray(out)).max() > 1e-2
  _assert_close(out, np_dit(moved, x, noise, labels, TINY))


def test_init_distributions():
  cfg = dict(TINY, hidden_size=128, depth=1, num_classes=100, in_channels=4, out_channels=4)
  model = DiT(**cfg)
  x, noise, labels = _inputs(cfg, batch=1)
  flat = flax.traverse_util.flatten_dict(_init(model, x, noise, labels), sep="/")
  for name, leaf in flat.items():
    leaf = np.asarray(leaf)
    assert leaf.dtype == np.float32, name
    if name.endswith("bias") or "adaLN_modulation" in name or name.startswith("final_layer/lin"):
      assert not leaf.any(), f"{name} should be zero-initialised"
    elif name.startswith(("t_embedder", "y_embedder")):
      assert abs(leaf.std() - 0.02) < 0.002, (name, leaf.std())
    else:  # xavier-uniform, the patch kernel as a (p p Cin, D) linear
      fan_in, fan_out = math.prod(leaf.shape[:-1]), leaf.shape[-1]
      bound = math.sqrt(6.0 / (fan_in + fan_out))
      assert np.abs(leaf).max() <= bound, name
      assert abs(leaf.std() - bound / math.sqrt(3.0)) < 0.1 * bound / math.sqrt(3.0), name


# ------------------------------------------------------------------------------------------------
# 4. Class labels.


def test_class_labels():
  model = DiT(**TINY)
  k = TINY["num_classes"]
  x, noise, labels = _inputs(TINY, batch=2)
  params = _randomize(_init(model, x, noise, labels), seed=7)
  apply = functools.partial(model.apply, {"params": params}, train=False)
  a = np.asarray(apply(x, noise, np.array([0, k], np.int32)))
  b = np.asarray(apply(x, noise, np.array([1, 1], np.int32)))
  assert np.abs(a - b).max(axis=(1, 2, 3)).min() > 1e-3  # both samples change
  # The null row k is a row of its own: editing it moves only the null-labelled sample.
  edited = flax.core.unfreeze(params)
  edited["y_embedder"]["embedding"] = edited["y_embedder"]["embedding"].at[k].add(1.0)
  c = np.asarray(model.apply({"params": edited}, x, noise, np.array([0, k], np.int32), train=False))
  assert np.array_equal(a[0], c[0]) and np.abs(a[1] - c[1]).max() > 1e-3
  # Past the table: NaN (jnp.take's fill mode), not a silent clamp to the null row.
  assert np.isnan(np.asarray(apply(x, noise, np.array([k + 1, 0], np.int32)))[0]).all()

  with pytest.raises(ValueError, match="needs class labels"):
    apply(x, noise)
  uncond = DiT(**dict(TINY, num_classes=0))
  with pytest.raises(ValueError, match="class labels given to an unconditional"):
    uncond.init(jax.random.key(0), x, noise, np.zeros(2, np.int32), train=False)


# ------------------------------------------------------------------------------------------------
# 5. Shape errors.


def test_shape_errors():
  model = DiT(**TINY)
  _, noise, labels = _inputs(TINY, batch=1)
  with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(1, 8, 8, 4\)"):
    model.init(jax.random.key(0), np.zeros((1, 8, 8, 4), np.float32), noise, labels, train=False)
  with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(1, 6, 6, 3\)"):
    model.init(jax.random.key(0), np.zeros((1, 6, 6, 3), np.float32), noise, labels, train=False)
  odd = DiT(**dict(TINY, input_size=10, patch_size=4))
  with pytest.raises(ValueError, match=r"\(10, 10\).*patch size 4"):
    odd.init(jax.random.key(0), np.zeros((1, 10, 10, 3), np.float32), noise, labels, train=False)


# ------------------------------------------------------------------------------------------------
# 6. bfloat16.


def test_bfloat16_close_to_float32():
  x, noise, labels = _inputs(TINY)
  f32 = DiT(**TINY)
  bf16 = DiT(**TINY, dtype=jnp.bfloat16)
  fresh = _init(bf16, x, noise, labels)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(fresh))
  params = _randomize(_init(f32, x, noise, labels), seed=9)
  ref = f32.apply({"params": params}, x, noise, labels, train=False)
  got = bf16.apply({"params": params}, x, noise, labels, train=False)
  assert got.dtype == jnp.float32
  _assert_close(got, ref, rtol=5e-2)


# ------------------------------------------------------------------------------------------------
# 7. Names.


def test_dit_size():
  assert dit_size("DiT-B/2") == dict(hidden_size=768, depth=12, num_heads=12, patch_size=2)
  assert dit_size("XL/8") == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=8)
  assert dit_size("S/4") == dict(hidden_size=384, depth=12, num_heads=6, patch_size=4)
  for bad in ("DiT-Q/3", "B/3", "DiT-B", "b/2", "DiT-B/2x"):
    with pytest.raises(ValueError, match=r"DiT-XL/8") as info:
      dit_size(bad)
    assert repr(bad) in str(info.value)

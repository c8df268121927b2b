"""Tests of lct_jax.core.models.{layers,unet}: EDM DhariwalUNet in Flax and the NsLN final norm.

Every numeric check compares against an independent float64 numpy computation written from the
architecture description (docs/method.md §3.6 and §4.1, EDM's DhariwalUNet), never against
captured outputs; parameter counts come from closed-form per-layer formulas.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lct_jax.core.models import layers
from lct_jax.core.models.unet import DhariwalUNet

TINY = dict(
  img_resolution=8,
  in_channels=2,
  out_channels=2,
  model_channels=32,
  channel_mult=(1, 2),
  num_blocks=1,
  attn_resolutions=(4,),
)
ZERO_INIT = ("conv1", "proj", "out_conv")


# ------------------------------------------------------------------------------------------------
# Independent parameter count: walk DhariwalUNet's structure with closed-form layer sizes.


def count_dhariwal_params(
  res: int,
  cin: int,
  cout: int,
  mc: int,
  mult: tuple[int, ...],
  nb: int,
  attn_res: tuple[int, ...],
  final_norm: str = "group",
  nsln_everywhere: bool = False,
) -> int:
  emb = 4 * mc

  def conv(k, ci, co):
    return k * k * ci * co + co

  def linear(i, o):
    return i * o + o

  def norm(c, r):  # inner norm at spatial size r x r
    return r * r * c if nsln_everywhere else 2 * c

  def block(ci, co, r_in, r_out, attn):
    n = norm(ci, r_in) + conv(3, ci, co) + linear(emb, 2 * co) + norm(co, r_out) + conv(3, co, co)
    if ci != co:
      n += conv(1, ci, co)  # 1x1 skip only when the channel count changes
    if attn and co // 64 > 0:  # 64 channels per head; no head, no attention (EDM)
      n += norm(co, r_out) + conv(1, co, 3 * co) + conv(1, co, co)
    return n

  total = linear(mc, emb) + linear(emb, emb)
  c, skips = cin, []
  for level, m in enumerate(mult):
    r = res >> level
    if level == 0:
      total += conv(3, c, mc * m)
      c = mc * m
    else:
      total += block(c, c, 2 * r, r, False)
    skips.append(c)
    for _ in range(nb):
      total += block(c, mc * m, r, r, r in attn_res)
      c = mc * m
      skips.append(c)
  for level in reversed(range(len(mult))):
    r, m = res >> level, mult[level]
    if level == len(mult) - 1:
      total += block(c, c, r, r, True) + block(c, c, r, r, False)
    else:
      total += block(c, c, r // 2, r, False)
    for _ in range(nb + 1):
      total += block(c + skips.pop(), mc * m, r, r, r in attn_res)
      c = mc * m
  total += {"group": 2 * c, "nsln": res * res * c, "layer": 2 * res * res * c}[final_norm]
  return total + conv(3, c, cout)


def abstract_param_count(model: DhariwalUNet) -> int:
  r, c = model.img_resolution, model.in_channels
  shapes = jax.eval_shape(
    lambda k: model.init(k, jnp.zeros((1, r, r, c)), jnp.zeros((1,)), train=False),
    jax.random.key(0),
  )
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


PAPER = dict(
  img_resolution=32,
  in_channels=4,
  out_channels=4,
  model_channels=128,
  channel_mult=(1, 2, 3, 4),
  num_blocks=4,
  attn_resolutions=(16, 8),
)


def test_param_count_paper_config():
  args = (32, 4, 4, 128, (1, 2, 3, 4), 4, (16, 8))
  counts = {}
  for norm in ("group", "nsln", "layer"):
    counts[norm] = abstract_param_count(DhariwalUNet(**PAPER, final_norm=norm))
    assert counts[norm] == count_dhariwal_params(*args, final_norm=norm), norm
  print("DhariwalUNet paper-config parameter counts:", counts)
  assert 150_000_000 < counts["group"] < 152_000_000  # 151,325,956 (docs/method.md §4.1)
  assert counts["nsln"] == counts["group"] - 2 * 128 + 32 * 32 * 128
  assert counts["layer"] == counts["group"] - 2 * 128 + 2 * 32 * 32 * 128
  everywhere = abstract_param_count(DhariwalUNet(**PAPER, nsln_everywhere=True))
  assert everywhere == count_dhariwal_params(*args, final_norm="nsln", nsln_everywhere=True)


@pytest.mark.parametrize(
  "cfg",
  [
    dict(TINY, final_norm="group"),
    dict(TINY, final_norm="layer", nsln_everywhere=True),
    # attention requested where C = 32 < 64 channels per head: EDM builds no attention there.
    dict(TINY, final_norm="nsln", attn_resolutions=(8, 4), channel_mult=(1, 2, 2), num_blocks=2),
  ],
)
def test_param_count_tiny_configs(cfg):
  expected = count_dhariwal_params(
    cfg["img_resolution"],
    cfg["in_channels"],
    cfg["out_channels"],
    cfg["model_channels"],
    cfg["channel_mult"],
    cfg["num_blocks"],
    cfg["attn_resolutions"],
    cfg["final_norm"],
    cfg.get("nsln_everywhere", False),
  )
  assert abstract_param_count(DhariwalUNet(**cfg)) == expected


# ------------------------------------------------------------------------------------------------
# float64 numpy references.


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_group_norm(x, p, eps=1e-5):
  b, h, w, c = x.shape
  g = min(32, c // 4)
  xs = x.reshape(b, h, w, g, c // g)
  mu = xs.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xs - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((xs - mu) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def np_layer_norm(x, p, eps=1e-5):
  flat = x.reshape(x.shape[0], -1)
  mu = flat.mean(axis=1)[:, None, None, None]
  var = flat.var(axis=1)[:, None, None, None]
  y = (x - mu) / np.sqrt(var + eps)
  return (y * p["scale"] if "scale" in p else y) + p["bias"]


def np_norm(x, p):
  return np_group_norm(x, p) if p["bias"].ndim == 1 else np_layer_norm(x, p)


def np_conv(x, p):
  """'same' k x k convolution, NHWC input, HWIO kernel, by summing shifted matmuls."""
  w = p["kernel"]
  k = w.shape[0]
  pad = k // 2
  _, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros(x.shape[:3] + (w.shape[-1],))
  for dy in range(k):
    for dx in range(k):
      out += xp[:, dy : dy + h, dx : dx + wd, :] @ w[dy, dx]
  return out + p["bias"]


def np_down(x):
  return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


def np_up(x):
  return x.repeat(2, axis=1).repeat(2, axis=2)


def np_attention(x, p, heads):
  b, h, w, c = x.shape
  qkv = np_conv(np_norm(x, p["norm2"]), p["qkv"]).reshape(b, h * w, 3 * c)
  ch = c // heads
  out = np.zeros((b, h * w, c))
  for n in range(heads):
    t = qkv[:, :, 3 * ch * n : 3 * ch * (n + 1)]  # per head: channels interleaved as (c, q|k|v)
    q, k, v = t[:, :, 0::3], t[:, :, 1::3], t[:, :, 2::3]
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(ch)
    logits -= logits.max(axis=-1, keepdims=True)
    wts = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    out[:, :, ch * n : ch * (n + 1)] = wts @ v
  return x + np_conv(out.reshape(b, h, w, c), p["proj"])


def np_block(p, x, emb, cout, up=False, down=False, heads=0):
  resample = np_up if up else np_down if down else (lambda a: a)
  h = np_conv(resample(np_silu(np_norm(x, p["norm0"]))), p["conv0"])
  params = emb @ p["affine"]["kernel"] + p["affine"]["bias"]
  scale, shift = params[:, None, None, :cout], params[:, None, None, cout:]
  h = np_silu(shift + np_norm(h, p["norm1"]) * (scale + 1.0))
  h = np_conv(h, p["conv1"])
  skip = np_conv(resample(x), p["skip"]) if "skip" in p else resample(x)
  x = h + skip
  return np_attention(x, p["attn"], heads) if heads else x


def np_positional_embedding(x, c):
  freqs = (1.0 / 10000.0) ** (np.arange(c // 2) / (c // 2))
  arg = np.outer(x, freqs)
  return np.concatenate([np.cos(arg), np.sin(arg)], axis=1)


def np_tiny_unet(p, x, noise):
  """The TINY DhariwalUNet (8x8, 32/64 channels, 1 block, attention at 4x4) written out by hand."""
  lin = lambda a, q: a @ q["kernel"] + q["bias"]  # noqa: E731
  emb = np_silu(lin(np_positional_embedding(noise, 32), p["map_layer0"]))
  emb = np_silu(lin(emb, p["map_layer1"]))
  s0 = np_conv(x, p["enc_8x8_conv"])
  s1 = np_block(p["enc_8x8_block0"], s0, emb, 32)
  s2 = np_block(p["enc_4x4_down"], s1, emb, 32, down=True)
  s3 = np_block(p["enc_4x4_block0"], s2, emb, 64, heads=1)
  h = np_block(p["dec_4x4_in0"], s3, emb, 64, heads=1)
  h = np_block(p["dec_4x4_in1"], h, emb, 64)
  h = np_block(p["dec_4x4_block0"], np.concatenate([h, s3], -1), emb, 64, heads=1)
  h = np_block(p["dec_4x4_block1"], np.concatenate([h, s2], -1), emb, 64, heads=1)
  h = np_block(p["dec_8x8_up"], h, emb, 64, up=True)
  h = np_block(p["dec_8x8_block0"], np.concatenate([h, s1], -1), emb, 32)
  h = np_block(p["dec_8x8_block1"], np.concatenate([h, s0], -1), emb, 32)
  return np_conv(np_silu(np_norm(h, p["out_norm"])), p["out_conv"])


def to_np64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def perturb(params, seed, scale=0.05):
  """Add N(0, scale^2) noise to every parameter, so zero-init layers and norms are non-trivial.

  numpy RNG on purpose: a jax.random call per parameter shape costs seconds of XLA compile on CPU.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: jnp.asarray(a + scale * rng.normal(size=a.shape), jnp.float32), params
  )


def random_params(module, *args, seed=0, **kwargs):
  """Random parameters of `module` from its abstract init (no jax RNG compile): kernels with std
  1/sqrt(fan_in), biases and norm shifts N(0, 0.1^2), norm scales 1 + N(0, 0.1^2)."""
  shapes = jax.eval_shape(lambda k: module.init(k, *args, **kwargs), jax.random.key(0))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    return (1.0 if name == "scale" else 0.0) + 0.1 * rng.normal(size=s.shape)

  return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes)


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# Layers.


@pytest.mark.parametrize("use_scale", [False, True])
def test_nsln_and_layernorm_vs_numpy(use_scale):
  x = 3.0 * jax.random.normal(jax.random.key(1), (3, 4, 5, 6)) + 2.0
  mod = layers.NsLN(use_scale=use_scale)
  params = mod.init(jax.random.key(0), x)["params"]
  assert set(params) == ({"bias", "scale"} if use_scale else {"bias"})
  assert params["bias"].shape == (4, 5, 6) and not np.any(params["bias"])
  params = perturb(params, 2, scale=1.0)  # non-zero beta, gamma != 1
  y = mod.apply({"params": params}, x)
  assert y.dtype == jnp.float32
  ref = np_layer_norm(np.asarray(x, np.float64), to_np64(params))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # the normalisation is over all of (H, W, C) per sample: the first sample does not see the others
  y0 = mod.apply({"params": params}, x[:1])
  np.testing.assert_allclose(y0, y[:1], rtol=1e-6, atol=1e-6)


def test_group_norm_and_make_norm():
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 64)) * 2.0 + 1.0
  mod = layers.GroupNorm()
  params = perturb(mod.init(jax.random.key(0), x)["params"], 3, 1.0)
  ref = np_group_norm(np.asarray(x, np.float64), to_np64(params))
  np.testing.assert_allclose(mod.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)
  assert isinstance(layers.make_norm("group"), layers.GroupNorm)
  assert layers.make_norm("layer").use_scale and not layers.make_norm("nsln").use_scale
  with pytest.raises(ValueError):
    layers.make_norm("batch")


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_normalize_one_pass_is_accurate_far_from_zero(groups):
  # mean 1000, spread 0.05: E[x^2] - E[x]^2 without the shift loses every digit in float32
  # (1e6 * 6e-8 = 0.06 > var = 0.0025); the result must match a float64 two-pass computation.
  rng = np.random.default_rng(5)
  x = (1000.0 + 0.05 * rng.normal(size=(3, 6, 5, 16)) + rng.normal(size=(3, 1, 1, 16))).astype(
    np.float32
  )
  y = layers.normalize(jnp.asarray(x), groups, 1e-5)
  xs = np.asarray(x, np.float64).reshape(3, 6, 5, groups, 16 // groups)
  mu = xs.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xs - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  ref = ((xs - mu) / np.sqrt(var + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(y, ref, atol=2e-3)  # float32 rounding of x itself: 6e-5 / 0.05
  assert rel_err(y, ref) < 2e-4


def test_group_norm_gradient_vs_numpy():
  # d/dx of sum(r * GroupNorm(x)) against the closed form of the normalisation's backward pass:
  # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per group, g = r * scale.
  rng = np.random.default_rng(6)
  x = rng.normal(2.0, 3.0, size=(2, 4, 4, 64))
  r = rng.normal(size=x.shape)
  mod = layers.GroupNorm()
  params = perturb(mod.init(jax.random.key(0), jnp.zeros(x.shape))["params"], 3, 1.0)

  def loss(x, params):
    return jnp.sum(jnp.asarray(r, jnp.float32) * mod.apply({"params": params}, x))

  dx, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.float32), params)
  p = to_np64(params)
  xs = x.reshape(2, 4, 4, 16, 4)
  mu = xs.mean(axis=(1, 2, 4), keepdims=True)
  rstd = 1.0 / np.sqrt(((xs - mu) ** 2).mean(axis=(1, 2, 4), keepdims=True) + 1e-5)
  xhat = (xs - mu) * rstd
  g = (r * p["scale"]).reshape(xs.shape)
  mean = lambda a: a.mean(axis=(1, 2, 4), keepdims=True)  # noqa: E731
  ref_dx = (rstd * (g - mean(g) - xhat * mean(g * xhat))).reshape(x.shape)
  assert rel_err(dx, ref_dx) < 1e-5
  assert rel_err(dp["scale"], (r * xhat.reshape(x.shape)).sum(axis=(0, 1, 2))) < 1e-5
  assert rel_err(dp["bias"], r.sum(axis=(0, 1, 2))) < 1e-5


def np_normalize(x, groups, eps=1e-5):
  """Two-pass float64 normalisation over (spatial..., channels of the group), per sample."""
  xs = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mu = xs.mean(axis=axes, keepdims=True)
  var = ((xs - mu) ** 2).mean(axis=axes, keepdims=True)
  return ((xs - mu) / np.sqrt(var + eps)).reshape(x.shape)


@pytest.mark.parametrize("groups", [1, 8])
def test_normalize_jvp_vs_finite_differences(groups):
  # Forward mode through the written-out derivative: against a central difference of the float64
  # numpy normalisation (step 1e-4: truncation ~1e-8, rounding ~1e-12).
  rng = np.random.default_rng(7)
  x, dx = rng.normal(1.0, 2.0, size=(2, 4, 4, 32)), rng.normal(size=(2, 4, 4, 32))
  y, dy = jax.jvp(
    lambda v: layers.normalize(v, groups, 1e-5),
    (jnp.asarray(x, jnp.float32),),
    (jnp.asarray(dx, jnp.float32),),
  )
  eps = 1e-4
  ref = (np_normalize(x + eps * dx, groups) - np_normalize(x - eps * dx, groups)) / (2 * eps)
  assert rel_err(y, np_normalize(x, groups)) < 1e-5
  assert rel_err(dy, ref) < 1e-5


def test_normalize_second_derivative_vs_autodiff_of_the_plain_formula():
  # grad of a function of the jvp (what continuous-time consistency training differentiates):
  # against JAX's own autodiff of the textbook two-pass formula, no custom rule involved.
  def plain(v, groups, eps=1e-5):
    vs = v.reshape(v.shape[:-1] + (groups, v.shape[-1] // groups))
    mu = vs.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(vs - mu).mean(axis=(1, 2, 4), keepdims=True)
    return ((vs - mu) * jax.lax.rsqrt(var + eps)).reshape(v.shape)

  rng = np.random.default_rng(8)
  x, dx, r = (jnp.asarray(rng.normal(size=(2, 4, 4, 32)), jnp.float32) for _ in range(3))

  def objective(norm):
    return lambda v: jnp.sum(r * jax.jvp(lambda u: norm(u, 4), (v,), (dx,))[1] ** 2)

  got = jax.grad(objective(lambda u, g: layers.normalize(u, g, 1e-5)))(x)
  want = jax.grad(objective(plain))(x)
  assert rel_err(got, np.asarray(want, np.float64)) < 1e-4


def test_positional_embedding_and_resampling_vs_numpy():
  noise = np.array([-500.0, 0.0, 3.7, 250.0 * np.log(80.0)])
  emb = layers.positional_embedding(jnp.asarray(noise, jnp.float32), 128)
  np.testing.assert_allclose(emb, np_positional_embedding(noise, 128), atol=2e-4)
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 3))
  np.testing.assert_allclose(layers.downsample_2x(jnp.asarray(x)), np_down(x), atol=1e-6)
  np.testing.assert_allclose(layers.upsample_2x(jnp.asarray(x)), np_up(x), atol=0)


def test_self_attention_vs_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 128))
  mod = layers.SelfAttention(num_heads=2)
  params = random_params(mod, x, seed=2)
  y = mod.apply({"params": params}, x)
  ref = np_attention(np.asarray(x, np.float64), to_np64(params), heads=2)
  assert rel_err(y, ref) < 1e-5
  with pytest.raises(ValueError, match="attention implementation"):
    layers.attention_op(jnp.zeros((1, 2, 2, 6)), 1, "flash")


@pytest.mark.parametrize(
  "cin,cout,up,down",
  [(16, 32, True, False), (32, 32, False, True), (32, 16, False, False), (32, 32, False, False)],
)
def test_unet_block_vs_numpy(cin, cout, up, down):
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, cin))
  emb = jax.random.normal(jax.random.key(1), (2, 24))
  mod = layers.UNetBlock(cout, up=up, down=down)
  params = random_params(mod, x, emb, train=False, seed=3)
  assert ("skip" in params) == (cin != cout)  # no resample projection (resample_proj=False)
  assert "attn" not in params
  y = jax.jit(lambda p: mod.apply({"params": p}, x, emb, train=False))(params)
  ref = np_block(
    to_np64(params), np.asarray(x, np.float64), np.asarray(emb, np.float64), cout, up, down
  )
  assert y.shape == ref.shape
  assert rel_err(y, ref) < 1e-5


def test_kaiming_uniform_init_bounds():
  """EDM: w = init_weight * sqrt(3 / fan_in) * (2U - 1) with init_weight = sqrt(1/3)."""
  x = jnp.zeros((1, 8, 8, 128))
  p = layers.Conv2d(256, 3).init(jax.random.key(0), x)["params"]
  bound = math.sqrt(1.0 / 3.0) * math.sqrt(3.0 / (128 * 9))
  w, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
  assert w.shape == (3, 3, 128, 256) and w.dtype == np.float32
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.999 * bound
  assert abs(w.std() - bound / math.sqrt(3.0)) < 0.01 * bound  # uniform: std = bound / sqrt(3)
  assert abs(np.mean(np.abs(w) < bound / 2) - 0.5) < 0.01
  assert abs(w.mean()) < 0.01 * bound
  assert np.abs(b).max() <= bound and np.abs(b).max() > 0.9 * bound  # bias: same fan-in scaling
  lp = layers.Linear(512).init(jax.random.key(1), jnp.zeros((1, 128)))["params"]
  assert lp["kernel"].shape == (128, 512)
  lb = 1.0 / math.sqrt(128)
  assert lb * 0.999 < np.abs(lp["kernel"]).max() <= lb and np.abs(lp["bias"]).max() <= lb


# ------------------------------------------------------------------------------------------------
# The tiny network.


@pytest.fixture(scope="module")
def tiny():
  model = DhariwalUNet(**TINY, final_norm="group")
  x = jax.random.normal(jax.random.key(10), (2, 8, 8, 2))
  noise = jnp.array([250.0 * math.log(0.5), 250.0 * math.log(20.0)])
  # Real init, jitted, at batch 1 (params do not depend on the batch). With threefry keys XLA:CPU
  # spends 10-30 s compiling ~90 uniform draws; an unsafe_rbg key compiles ~2.5x faster and the
  # init distribution (what the tests check) is the same.
  init = jax.jit(lambda k: model.init(k, x[:1], noise[:1], train=False))
  params = init(jax.random.key(11, impl="unsafe_rbg"))["params"]
  fwd = jax.jit(lambda p: model.apply({"params": p}, x, noise, train=False))
  return model, x, noise, params, fwd


def test_tiny_structure_and_init(tiny):
  model, x, noise, params, fwd = tiny
  expected = {"map_layer0", "map_layer1", "enc_8x8_conv", "enc_8x8_block0", "enc_4x4_down"}
  expected |= {"enc_4x4_block0", "dec_4x4_in0", "dec_4x4_in1", "dec_4x4_block0", "dec_4x4_block1"}
  expected |= {"dec_8x8_up", "dec_8x8_block0", "dec_8x8_block1", "out_norm", "out_conv"}
  assert set(params) == expected
  with_attn = {k for k, v in params.items() if "attn" in v}
  assert with_attn == {"enc_4x4_block0", "dec_4x4_in0", "dec_4x4_block0", "dec_4x4_block1"}
  assert "skip" not in params["enc_4x4_down"] and "skip" not in params["dec_8x8_up"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [k.key for k in path]
    assert leaf.dtype == jnp.float32
    if any(n in names for n in ZERO_INIT):
      assert not np.any(leaf), names
    elif "norm" in names[-2]:
      assert np.all(leaf == (1.0 if names[-1] == "scale" else 0.0)), names
    else:
      layer = params
      for n in names[:-1]:
        layer = layer[n]
      bound = 1.0 / math.sqrt(math.prod(layer["kernel"].shape[:-1]))  # EDM: 1/sqrt(fan_in)
      assert 0.5 * bound < np.abs(leaf).max() <= bound, names


def test_tiny_forward_zero_init_and_vs_numpy(tiny):
  _, x, noise, params, fwd = tiny
  y = fwd(params)
  assert y.shape == (2, 8, 8, 2) and y.dtype == jnp.float32
  np.testing.assert_array_equal(y, 0.0)  # zero-init output conv
  assert np.abs(fwd(dict(params, out_conv=perturb(params["out_conv"], 12)))).min() > 0
  # every parameter perturbed: the whole forward pass against the hand-written numpy network
  pp = perturb(params, 13)
  ref = np_tiny_unet(to_np64(pp), np.asarray(x, np.float64), np.asarray(noise, np.float64))
  assert rel_err(fwd(pp), ref) < 1e-4


def test_final_norm_variants(tiny):
  _, x, noise, _, _ = tiny
  for norm, everywhere in [("nsln", False), ("layer", False), ("nsln", True)]:
    model = DhariwalUNet(**TINY, final_norm=norm, nsln_everywhere=everywhere)
    shapes = jax.eval_shape(lambda k: model.init(k, x, noise, train=False), jax.random.key(0))
    shapes = shapes["params"]
    assert shapes["out_norm"]["bias"].shape == (8, 8, 32)
    assert ("scale" in shapes["out_norm"]) == (norm == "layer")
    block = shapes["enc_4x4_down"]  # norm0 sees the 8x8 input, norm1 the 4x4 output
    assert block["norm0"]["bias"].shape == ((8, 8, 32) if everywhere else (32,))
    assert block["norm1"]["bias"].shape == ((4, 4, 32) if everywhere else (32,))
    assert ("scale" in block["norm0"]) == (not everywhere)
  # forward of the ablation network against the numpy network (which dispatches on beta's shape)
  model = DhariwalUNet(**TINY, final_norm="layer", nsln_everywhere=True)
  pp = random_params(model, x, noise, train=False, seed=1)
  y = jax.jit(lambda p: model.apply({"params": p}, x, noise, train=False))(pp)
  ref = np_tiny_unet(to_np64(pp), np.asarray(x, np.float64), np.asarray(noise, np.float64))
  assert rel_err(y, ref) < 1e-4


def test_dropout_shared_key(tiny):
  _, x, noise, params, fwd = tiny
  model = DhariwalUNet(**TINY, final_norm="group", dropout=0.5)
  pp = perturb(params, 20)
  run = jax.jit(
    lambda key, train: model.apply({"params": pp}, x, noise, train=train, rngs={"dropout": key}),
    static_argnums=1,
  )
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a, b, c = run(k1, True), run(k1, True), run(k2, True)
  np.testing.assert_array_equal(a, b)  # same key, same masks
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  assert np.abs(np.asarray(a) - np.asarray(fwd(pp))).max() > 1e-3
  # train=False: deterministic, independent of the key, equal to the network without dropout
  e1, e2 = run(k1, False), run(k2, False)
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_allclose(e1, fwd(pp), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute(tiny):
  _, x, noise, params, fwd = tiny
  model16 = DhariwalUNet(**TINY, final_norm="group", dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda k: model16.init(k, x, noise, train=False), jax.random.key(0))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)
  pp = perturb(params, 1)
  y16 = jax.jit(lambda p: model16.apply({"params": p}, x, noise, train=False))(pp)
  assert y16.dtype == jnp.float32
  err = rel_err(y16, np.asarray(fwd(pp), np.float64))
  assert 0 < err < 5e-2, err

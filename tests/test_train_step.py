"""The sharded train step: compile-once across N, device-count invariance, learning, guards,
optimizer."""

import functools
import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import test as test_config
from lct_jax import config_lib
from lct_jax.core import curriculum, karras, ot, sampling, train
from lct_jax.core import mesh as mesh_lib
from lct_jax.io import coupling


@functools.lru_cache(maxsize=None)
def _compiled(config_json, num_devices):
  """Trainer and jitted init per (config, devices): tests share compilations."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  trainer = config_lib.build_trainer(config, mesh_lib.make_mesh(num_devices))
  return trainer, jax.jit(trainer.init_state)


def build(config, num_devices):
  trainer, init = _compiled(config.to_json(), num_devices)
  return trainer.mesh, trainer.model, init(jax.random.PRNGKey(config.seed)), trainer.train_step


def dataset(config, n=32, seed=0):
  """Smooth random patterns (fixed, tiny), standardized to std 0.5 like normalized latents."""
  h, w, c = config_lib.example_shape(config)
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  f = rng.uniform(1, 3, size=(n, 1, 1, c))
  phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, c))
  x = np.sin(2 * np.pi * f * (xx[None, :, :, None] + yy[None, :, :, None]) + phase)
  return (0.5 * x / x.std()).astype(np.float32)


def put(x, mesh):
  return jax.device_put(x, mesh_lib.batch_sharding(mesh))


def test_compiles_once_across_curriculum_stages():
  config = test_config.get_config()
  config.train.total_steps = 12  # s0=2, s1=8: N goes 3, 5, 9 every 4 steps
  mesh, _, state, step = build(config, 8)
  data = dataset(config, 16)
  seen = set()
  for _ in range(12):
    state, metrics = step(state, {"x": put(data, mesh)})
    seen.add(int(metrics["num_scales"]))
  assert seen == {3, 5, 9}
  assert step._cache_size() == 1


def run_steps(config, num_devices, steps, data):
  mesh, _, state, step = build(config, num_devices)
  history = []
  for _ in range(steps):
    state, metrics = step(state, {"x": put(data, mesh)})
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_same_loss_on_one_and_eight_devices():
  config = test_config.get_config()
  config.ot.scope = "global"  # local scope couples per device, which depends on the device count
  data = dataset(config, 16)
  s1, h1 = run_steps(config, 1, 3, data)
  s8, h8 = run_steps(config, 8, 3, data)
  for a, b in zip(h1, h8):
    for k in ("loss", "ct_loss", "diff_loss", "diff_fraction", "num_scales", "c"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), s1.params, s8.params
  )


class _ArrayBatches:
  """GlobalBatches' protocol (next_batch, wait_s, get/set_state) over fixed global batches."""

  def __init__(self, arrays, mesh):
    self.arrays, self.mesh, self.next_batch, self.wait_s = arrays, mesh, 0, 0.0

  def __next__(self):
    self.next_batch += 1
    return {"x": put(self.arrays[self.next_batch - 1], self.mesh)}

  def set_state(self, state):
    self.next_batch = json.loads(state)["next_batch"]


@pytest.mark.parametrize("scope", ["global", "local"])
def test_host_coupling_one_step_ahead_equals_the_in_step_coupling(scope):
  config = test_config.get_config()
  config.ot.scope = scope  # method "exact": scipy on the host
  data = [dataset(config, 16, seed=s) for s in range(6)]  # 5 steps + the last read-ahead
  mesh, _, state, step = build(config, 8)
  trainer = _compiled(config.to_json(), 8)[0]
  for x in data[:5]:
    state, _ = step(state, {"x": put(x, mesh)})
  in_step = jax.device_get(state)

  _, _, state, _ = build(config, 8)
  inner = _ArrayBatches(data, mesh)
  coupled = coupling.HostCoupledBatches(inner, trainer.coupling_cost, state.key, mesh)
  perms = []
  for n in range(5):
    batch = next(coupled)
    # One batch read ahead, but the saved position is the batches handed to the step.
    assert json.loads(coupled.get_state()) == {"next_batch": n + 1}
    assert inner.next_batch == n + 2
    perms.append(np.asarray(batch["ot_perm"]))
    state, _ = step(state, batch)
    if n == 1:  # a restore in the middle: the read-ahead batch is dropped and read again
      coupled.set_state(coupled.get_state())
  coupled.close()
  # global: a permutation of the 16 rows; local: of each device's 2 rows, in that shard's indices
  blocks = [p.reshape(-1, 2 if scope == "local" else 16) for p in perms]
  assert all(sorted(b) == list(range(b.size)) for bs in blocks for b in bs)
  assert any(not np.array_equal(b, np.arange(b.size)) for bs in blocks for b in bs)  # it coupled
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), in_step)


def test_microbatches_give_the_global_batch_update():
  config = test_config.get_config()
  config.ot.scope = "global"
  data = dataset(config, 16)
  s1, h1 = run_steps(config, 4, 2, data)
  config.train.microbatches = 2
  s2, h2 = run_steps(config, 4, 2, data)
  for a, b in zip(h1, h2):
    for k in ("loss", "ct_loss", "diff_loss", "grad_norm", "diff_fraction"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1.params, s2.params
  )


def test_a_few_hundred_steps_drive_the_loss_down():
  config = test_config.get_config()
  config.lct.s0 = config.lct.s1 = (
    10  # a fixed N and c, so the losses of early and late steps compare
  )
  config.lct.c_schedule = "constant"
  config.train.total_steps = 300
  config.optim.learning_rate = 2e-3
  data = dataset(config, 16)
  _, hist = run_steps(config, 1, 300, data)
  loss = np.array([h["loss"] for h in hist])
  assert np.all(np.isfinite(loss))
  assert loss[-50:].mean() < 0.6 * loss[:20].mean(), (loss[:20].mean(), loss[-50:].mean())


def test_a_streak_of_max_nonfinite_steps_halts_the_step_on_the_device():
  config = test_config.get_config()
  config.train.max_consecutive_nonfinite = 2
  mesh, _, state, step = build(config, 8)
  data = dataset(config, 16)
  bad = data.copy()
  bad[0, 0, 0, 0] = np.nan
  state, _ = step(state, {"x": put(data, mesh)})
  for _ in range(2):  # steps 2 and 3 (indices 1, 2) are skipped: the streak reaches the maximum
    state, metrics = step(state, {"x": put(bad, mesh)})
  halted = jax.device_get(state)
  assert int(halted.nonfinite_streak) == 2 and int(halted.last_nonfinite_step) == 2
  # From now on no step counts, finite or not: the state stays as it was at the streak's end.
  for batch in (data, bad, data):
    state, metrics = step(state, {"x": put(batch, mesh)})
  jax.tree.map(np.testing.assert_array_equal, halted, jax.device_get(state))


def test_nonfinite_step_changes_nothing_but_the_counters():
  config = test_config.get_config()
  config.optim.warmup_steps = 10  # lr(t) = 1e-3 * t / 10 after t applied updates
  mesh, _, state, step = build(config, 8)
  data = dataset(config, 16)
  state, metrics = step(state, {"x": put(data, mesh)})
  assert float(metrics["learning_rate"]) == 0.0
  before = jax.device_get(state)
  bad = data.copy()
  bad[3, 0, 0, 0] = np.nan
  state, metrics = step(state, {"x": put(bad, mesh)})
  after = jax.device_get(state)
  assert int(metrics["nonfinite"]) == 1
  assert int(after.nonfinite_steps) == 1 and int(after.step) == int(before.step) + 1
  assert int(after.nonfinite_streak) == 1 and int(after.last_nonfinite_step) == int(before.step)
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(before, name), getattr(after, name))
  state, metrics = step(state, {"x": put(data, mesh)})  # and training goes on
  assert int(metrics["nonfinite"]) == 0 and int(state.nonfinite_streak) == 0
  assert int(state.last_nonfinite_step) == int(before.step)
  # The logged learning rate is the one this update applied: one update so far (step 2 of the
  # counter, which the skipped step advanced), so 1e-3 * 1 / 10.
  assert float(metrics["learning_rate"]) == pytest.approx(1e-4, rel=1e-6)


def test_compiled_step_copies_no_state_buffer():
  # The state is donated and written in place; a step that reads an input buffer after the output
  # aliased to it was written makes XLA copy that input first (a select of new against old state
  # did this for every parameter, EMA and moment: 1,842 copies per paper step).
  config = test_config.get_config()
  mesh, _, state, step = build(config, 1)
  data = dataset(config, 16)
  hlo = step.lower(state, {"x": put(data, mesh)}).compile().as_text()
  entry = hlo[hlo.index("\nENTRY") :]
  inputs = set(re.findall(r"^\s*%([\w.\-]+) = \S+ parameter\(", entry, re.M))
  copies = re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = (\S+) copy\(%([\w.\-]+)\)", entry, re.M)
  assert len(inputs) > len(jax.tree.leaves(state.params))
  # (a scalar, e.g. the step counter read after step + 1 is written, costs nothing)
  arrays = [name for shape, name in copies if name in inputs and not re.match(r"\w+\[\]", shape)]
  assert arrays == []


def test_ema_update():
  config = test_config.get_config()
  mesh, _, state, step = build(config, 8)
  p0 = jax.device_get(state.params)
  state, _ = step(state, {"x": put(dataset(config, 16), mesh)})
  p1, e1 = jax.device_get((state.params, state.ema_params))
  jax.tree.map(
    lambda e, a, b: np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-5, atol=1e-7),
    e1,
    p0,
    p1,
  )


def np_radam(theta, grads, lr, b1, b2, eps, wd):
  """torch.optim.RAdam with coupled L2 (Liu et al. 2020), float64, one parameter vector: once
  rho_t > 5 the step is lr r_t m_hat sqrt(1 - b2^t) / (sqrt(v_t) + eps), eps outside the bias
  correction (torch's documented update; optax.radam puts it on sqrt(v_t / (1 - b2^t)))."""
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  rho_inf = 2 / (1 - b2) - 1
  for t, g in enumerate(grads, start=1):
    g = g + wd * theta
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t > 5:
      r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
      theta = theta - lr * r * m_hat * math.sqrt(1 - b2**t) / (np.sqrt(v) + eps)
    else:
      theta = theta - lr * m_hat
  return theta


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_radam_with_coupled_weight_decay(scale):
  """At gradients of 1e-7 eps = 1e-8 is not negligible: where it sits (torch's sqrt(v) + eps or
  optax.radam's sqrt(v_hat) + eps) changes the first adaptive steps by up to 2x."""
  wd = 0.1 * scale  # keeps the decay term at the gradients' scale
  cfg = train.OptimConfig(learning_rate=1e-2, weight_decay=wd, eps=1e-8)
  tx, _ = train.make_optimizer(cfg)
  rng = np.random.default_rng(0)
  theta0 = rng.normal(size=7)
  grads = [scale * rng.normal(size=7) for _ in range(12)]  # adaptive from t = 6 (b2 = 0.999)
  params = jnp.asarray(theta0, jnp.float32)
  opt = tx.init(params)
  for g in grads:
    updates, opt = tx.update(jnp.asarray(g, jnp.float32), opt, params)
    params = optax.apply_updates(params, updates)
  want = np_radam(theta0, grads, 1e-2, 0.9, 0.999, 1e-8, wd)
  np.testing.assert_allclose(np.asarray(params) - theta0, want - theta0, rtol=1e-3, atol=5e-6)


def test_samplers_closed_form_at_init_and_device_invariance():
  """At init the output conv is zero, so f(x, s) = c_skip(s) x: the samples have a closed form."""
  config = test_config.get_config()
  noise_cfg = config_lib.noise_config(config)
  shape = config_lib.example_shape(config)
  key = jax.random.PRNGKey(7)
  idx = np.arange(16, dtype=np.int32)

  def c_skip(s):
    return 0.25 / ((s - 0.002) ** 2 + 0.25)

  z0 = np.stack(
    [
      np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0), shape))
      for i in idx
    ]
  )
  z1 = np.stack(
    [
      np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 1), shape))
      for i in idx
    ]
  )
  one_step = c_skip(80.0) * 80.0 * z0
  two_step = c_skip(0.821) * (one_step + math.sqrt(0.821**2 - 0.002**2) * z1)

  results = {}
  for devices, batch in ((1, 16), (8, 16), (8, 8)):
    mesh, model, state, _ = build(config, devices)
    for mids in ((), (0.821,)):
      sampler = sampling.make_sampler(model, noise_cfg, shape, mesh, mids)
      out = np.concatenate(
        [
          np.asarray(sampler(state.params, key, put(idx[s : s + batch], mesh)))
          for s in range(0, len(idx), batch)
        ]
      )
      results[(devices, batch, mids)] = out
  for (devices, batch, mids), out in results.items():
    np.testing.assert_allclose(out, two_step if mids else one_step, rtol=1e-5, atol=1e-5)


def test_samplers_agree_across_devices_with_a_trained_network():
  config = test_config.get_config()
  data = dataset(config, 16)
  outs = []
  for devices, batch in ((1, 16), (8, 8)):
    mesh, model, state, step = build(config, devices)
    for _ in range(3):
      state, _ = step(state, {"x": put(data, mesh)})
    sampler = sampling.make_sampler(
      model, config_lib.noise_config(config), config_lib.example_shape(config), mesh, (0.821,)
    )
    idx = np.arange(16, dtype=np.int32)
    outs.append(
      np.concatenate(
        [
          np.asarray(
            sampler(state.ema_params, jax.random.PRNGKey(1), put(idx[s : s + batch], mesh))
          )
          for s in range(0, 16, batch)
        ]
      )
    )
  assert np.abs(outs[0]).max() > 0
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-3, atol=1e-4)


def test_consistency_fn_used_by_sampler_respects_boundary():
  config = test_config.get_config()
  cfg = config_lib.noise_config(config)
  x = jnp.ones((2, 8, 8, 2))
  out = karras.consistency_fn(lambda a, b: a * 0 + 5.0, x, jnp.full((2,), cfg.sigma_min), cfg)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


class _Affine(nn.Module):
  """F(x, labels) = a x + b + e labels: a network whose loss and gradient numpy can redo."""

  channels: int

  @nn.compact
  def __call__(self, x, labels, *, train):
    del train
    a = self.param("a", lambda _: jnp.asarray(0.8, jnp.float32))
    b = self.param("b", lambda _: jnp.linspace(-0.2, 0.3, self.channels, dtype=jnp.float32))
    e = self.param("e", lambda _: jnp.asarray(2e-3, jnp.float32))
    return a * x + b + e * labels[:, None, None, None]


def np_step_loss(theta, theta_teacher, x, n, i, num_scales, c):
  """docs/method.md 3.7 in float64: L_CT + 5 L_diff for _Affine's parameters theta = (a, b, ..., e).
  """
  smin, smax, rho, sd = 0.002, 80.0, 7.0, 0.5

  def sigma(j):
    return (
      smax ** (1 / rho) + j / (num_scales - 1) * (smin ** (1 / rho) - smax ** (1 / rho))
    ) ** rho

  def f(th, x_in, s):  # f = c_skip x + c_out F(c_in x, 250 ln s), s per sample
    s = s[:, None, None, None]
    a, b, e = th[0], th[1:-1], th[-1]
    net = a * x_in / np.sqrt(s**2 + sd**2) + b + e * 250 * np.log(s)
    return sd**2 / ((s - smin) ** 2 + sd**2) * x_in + sd * (s - smin) / np.sqrt(s**2 + sd**2) * net

  s, s_next = sigma(i), sigma(i + 1)
  teacher = f(theta_teacher, x + s_next[:, None, None, None] * n, s_next)
  student = f(theta, x + s[:, None, None, None] * n, s)
  r2 = np.mean((student - teacher) ** 2, axis=(1, 2, 3))
  ct = np.mean(np.log1p(r2 / (2 * c**2)) / (s - s_next))
  mask = i >= np.floor(0.75 * num_scales)
  mse = np.mean((student - x) ** 2, axis=(1, 2, 3))
  diff = np.sum(mask * (1 / s**2 + 4) * mse) / max(mask.sum(), 1)
  return ct + 5 * diff, ct, diff


def test_step_against_float64_numpy():
  """The assembled step (OT pairing, intervals, student/teacher sigmas, stop-gradient teacher,
  Cauchy CT + masked diffusion loss, RAdam with weight decay, EMA) redone in float64 numpy for a
  network simple enough to differentiate by finite differences. Only the random draws (noise,
  interval indices) are taken from the code: the coupling is solved again with scipy."""
  from scipy.optimize import linear_sum_assignment

  mesh = mesh_lib.make_mesh(1)
  channels, batch, lr, wd = 2, 16, 0.05, 1e-2
  model = _Affine(channels)
  cfg = curriculum.CurriculumConfig(s0=4, s1=8, total_steps=12)  # N = 9 from step 6 on
  optim = train.OptimConfig(learning_rate=lr, weight_decay=wd, ema_decay=0.9)
  tx, schedule = train.make_optimizer(optim)
  step = train.make_train_step(model, tx, schedule, cfg, ot.OTConfig(), optim, mesh)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(3), (8, 8, channels), mesh)
  state = state.replace(step=jax.device_put(jnp.int32(7), mesh_lib.replicated(mesh)))
  x = dataset(test_config.get_config(), batch).astype(np.float64)
  key, k = jax.device_get(state.key), 7
  num_scales = 9
  c = np.exp(-1.15 * np.log(num_scales - 1) - 0.85)  # adaptive c, second stage

  noise, (k_index, *_) = train.step_noise(key, k, x.shape, mesh_lib.batch_sharding(mesh))
  i = np.asarray(curriculum.sample_intervals(k_index, num_scales, batch, cfg), np.int64)
  n = np.asarray(noise, np.float64)
  cost = ((x.reshape(batch, 1, -1) - n.reshape(1, batch, -1)) ** 2).sum(-1)
  rows, cols = linear_sum_assignment(cost)
  n = n[cols[np.argsort(rows)]]
  mask = i >= np.floor(0.75 * num_scales)
  assert 0 < mask.sum() < batch  # both terms of the loss are exercised

  p0 = jax.device_get(state.params)
  theta0 = np.concatenate([[p0["a"]], p0["b"], [p0["e"]]]).astype(np.float64)
  loss, ct, diff = np_step_loss(theta0, theta0, x, n, i, num_scales, c)
  grad = np.zeros_like(theta0)
  for j in range(theta0.size):  # the teacher stays at theta0: stop_gradient
    h = np.zeros_like(theta0)
    h[j] = 1e-6
    grad[j] = (
      np_step_loss(theta0 + h, theta0, x, n, i, num_scales, c)[0]
      - np_step_loss(theta0 - h, theta0, x, n, i, num_scales, c)[0]
    ) / 2e-6

  state, metrics = step(state, {"x": put(x.astype(np.float32), mesh)})
  m = jax.device_get(metrics)
  assert int(m["num_scales"]) == num_scales
  np.testing.assert_allclose(m["c"], c, rtol=1e-5)
  np.testing.assert_allclose([m["loss"], m["ct_loss"], m["diff_loss"]], [loss, ct, diff], rtol=2e-4)
  np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(grad), rtol=1e-3)
  np.testing.assert_allclose(m["diff_fraction"], mask.mean())
  assert m["learning_rate"] == pytest.approx(lr) and int(m["nonfinite"]) == 0
  p1 = jax.device_get(state.params)
  theta1 = np.concatenate([[p1["a"]], p1["b"], [p1["e"]]])
  want = np_radam(theta0, [grad], lr, 0.9, 0.999, 1e-8, wd)  # t = 1: theta - lr (g + wd theta)
  np.testing.assert_allclose(theta1 - theta0, want - theta0, rtol=1e-3)
  e1 = jax.device_get(state.ema_params)
  ema = np.concatenate([[e1["a"]], e1["b"], [e1["e"]]])
  np.testing.assert_allclose(ema, 0.9 * theta0 + 0.1 * theta1, rtol=1e-6)

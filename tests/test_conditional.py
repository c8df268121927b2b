"""Class conditioning, label dropout, classifier-free guidance and the fsdp mesh axis.

References are independent: the label-dropout draw is recomputed from its documented key, the
guided sampler against F_null + s (F_cond - F_null) evaluated by hand, the fsdp step against the
same step on one device.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from lct_jax import config_lib, schema
from lct_jax.core import karras, sampling, train
from lct_jax.core import mesh as mesh_lib
from lct_jax.io import summaries

K = 3  # classes of the toy problems


def dit_config(fsdp: int = 1):
  config = test_config.get_config()
  config.model.name = "dit"
  config.model.dit_size = "32x2x4/2"
  config.data.num_classes = K
  config.ot.scope = "global"  # local scope couples per device, which depends on the device count
  config.mesh.fsdp = fsdp
  return config


def batch(mesh, n=16, seed=0):
  rng = np.random.default_rng(seed)
  sharding = mesh_lib.batch_sharding(mesh)
  x = (0.5 * rng.standard_normal((n, 8, 8, 2))).astype(np.float32)
  y = rng.integers(0, K, n).astype(np.int32)
  return {"x": jax.device_put(x, sharding), "label": jax.device_put(y, sharding)}


class LabelRecorder(nn.Module):
  """A conditional toy network that hands every call's class labels to the host."""

  num_classes: int = K

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, *, train):
    del train
    jax.debug.callback(lambda y: CALLS.append(np.asarray(y)), class_labels)
    table = self.param("table", nn.initializers.normal(1.0), (self.num_classes + 1,))
    w = self.param("w", nn.initializers.ones, (x.shape[-1],))
    shift = (table[class_labels] + 1e-3 * noise_labels)[:, None, None, None]
    return x * w + shift


CALLS: list[np.ndarray] = []


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0])
def test_label_dropout_is_the_same_for_student_and_teacher(dropout):
  config = test_config.get_config()
  config.ot.method = "none"
  model = LabelRecorder()
  mesh = mesh_lib.make_mesh(1)
  tx, schedule = train.make_optimizer(config_lib.optim_config(config))
  step = train.make_train_step(
    model,
    tx,
    schedule,
    config_lib.curriculum_config(config),
    config_lib.ot_config(config),
    config_lib.optim_config(config),
    mesh,
    label_dropout=dropout,
  )
  state = train.create_train_state(model, tx, jax.random.PRNGKey(3), (8, 8, 2), mesh)
  data = batch(mesh, 16)
  labels = np.asarray(data["label"])
  for _ in range(2):
    key, number = np.asarray(state.key), int(state.step)
    CALLS.clear()
    state, _ = step(state, data)
    jax.effects_barrier()
    assert len(CALLS) == 2  # the teacher and the student
    np.testing.assert_array_equal(CALLS[0], CALLS[1])
    # The documented draw: bernoulli(fold_in(fold_in(key, step), 4), dropout) per row.
    k_label = jax.random.fold_in(jax.random.fold_in(jnp.asarray(key), number), 4)
    drop = np.asarray(jax.random.bernoulli(k_label, dropout, (16,)))
    np.testing.assert_array_equal(CALLS[0], np.where(drop, K, labels))
  if dropout == 1.0:
    assert (CALLS[0] == K).all()
  if dropout == 0.0:
    np.testing.assert_array_equal(CALLS[0], labels)


def test_a_conditional_step_needs_labels():
  config = dit_config()
  trainer = config_lib.build_trainer(config, mesh_lib.make_mesh(1))
  state = trainer.init_state(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="needs batch\\['label'\\]"):
    trainer.train_step(state, {"x": batch(trainer.mesh)["x"]})


def _trained(config, num_devices, steps=3):
  trainer = config_lib.build_trainer(config, mesh_lib.make_mesh(num_devices, config.mesh.fsdp))
  state = trainer.init_state(jax.random.PRNGKey(0))
  data = batch(trainer.mesh)
  for _ in range(steps):
    state, metrics = trainer.train_step(state, data)
  return trainer, state, metrics


def test_fsdp_step_equals_the_unsharded_step():
  _, ref, ref_metrics = _trained(dit_config(1), 1)
  for fsdp in (2, 8):
    trainer, state, metrics = _trained(dit_config(fsdp), 8)
    # The state really is split: every large leaf is sharded over "fsdp", on 8 / 2 or 8 / 8
    # devices' worth of rows each.
    kernel = state.params["blocks_0"]["fc1"]["kernel"]
    assert "fsdp" in kernel.sharding.spec
    assert kernel.addressable_shards[0].data.size == kernel.size // fsdp
    mu = jax.tree.leaves(state.opt_state)[3]
    assert mu.sharding.spec == mesh_lib.leaf_spec(mu.shape, fsdp)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(ref)), jax.tree.leaves(jax.device_get(state))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The sampler takes the sharded EMA params as they are.
    noise_cfg = config_lib.noise_config(dit_config(fsdp))
    sample = sampling.make_sampler(trainer.model, noise_cfg, (8, 8, 2), trainer.mesh, cfg_scale=2.0)
    idx = jax.device_put(np.arange(8, dtype=np.int32), mesh_lib.batch_sharding(trainer.mesh))
    assert np.isfinite(np.asarray(sample(state.ema_params, jax.random.PRNGKey(1), idx))).all()


def test_leaf_spec_splits_the_largest_divisible_dimension():
  assert mesh_lib.leaf_spec((6, 16), 1) == jax.sharding.PartitionSpec()
  assert mesh_lib.leaf_spec((6, 16), 2) == jax.sharding.PartitionSpec(None, "fsdp")
  assert mesh_lib.leaf_spec((16, 6), 2) == jax.sharding.PartitionSpec("fsdp")
  assert mesh_lib.leaf_spec((8, 8), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert mesh_lib.leaf_spec((3, 5), 2) == jax.sharding.PartitionSpec()
  assert mesh_lib.leaf_spec((), 2) == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="mesh.fsdp=3"):
    mesh_lib.make_mesh(8, 3)


def _hand_sampler(model, params, cfg, idx, sigma_mids, scale, class_label=-1):
  """The sampler written out: labels, guided F, then the consistency steps (float64 outside F)."""
  labels = idx % K if class_label < 0 else np.full_like(idx, class_label)

  def f_guided(x_in, noise):
    def f(y):
      return np.asarray(model.apply({"params": params}, x_in, noise, jnp.asarray(y), train=False))

    f_cond, f_null = f(labels).astype(np.float64), f(np.full_like(labels, K)).astype(np.float64)
    return f_null + scale * (f_cond - f_null)

  def step(x, s):
    sig = jnp.full((len(idx),), s, jnp.float32)
    scalings = karras.scalings(sig, cfg)
    c_skip, c_out, c_in = (np.asarray(v, np.float64)[:, None, None, None] for v in scalings)
    return c_skip * x + c_out * f_guided(jnp.asarray(c_in * x, jnp.float32), karras.c_noise(sig))

  key = jax.random.PRNGKey(5)
  z = np.asarray(sampling.sample_noise(key, idx, 0, (8, 8, 2)), np.float64)
  x = step(cfg.sigma_max * z, cfg.sigma_max)
  for draw, s in enumerate(sigma_mids, start=1):
    z = np.asarray(sampling.sample_noise(key, idx, draw, (8, 8, 2)), np.float64)
    x = step(x + np.sqrt(s**2 - cfg.sigma_min**2) * z, s)
  return x


@pytest.mark.parametrize("scale", [1.0, 0.0, 2.5])
@pytest.mark.parametrize("sigma_mids", [(), (0.821,)])
def test_guided_sampler_against_the_formula(scale, sigma_mids):
  config = dit_config()
  model = config_lib.build_model(config)
  mesh = mesh_lib.make_mesh(1)
  x, noise, y = jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, noise, y, train=False)["params"]
  # Random non-zero weights everywhere (a fresh DiT outputs exactly zero).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(
    tree, [0.2 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)]
  )
  cfg = config_lib.noise_config(config)
  idx = np.arange(6, dtype=np.int32)
  for class_label in (-1, 1):
    sample = sampling.make_sampler(model, cfg, (8, 8, 2), mesh, sigma_mids, scale, class_label)
    got = np.asarray(sample(params, jax.random.PRNGKey(5), jnp.asarray(idx)))
    want = _hand_sampler(model, params, cfg, idx, sigma_mids, scale, class_label)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  if scale == 1.0:  # CFG at scale 1 is the conditional sampler: exactly one call per step
    plain = sampling.make_sampler(model, cfg, (8, 8, 2), mesh, sigma_mids)
    np.testing.assert_array_equal(
      np.asarray(plain(params, jax.random.PRNGKey(5), jnp.asarray(idx))),
      np.asarray(
        sampling.make_sampler(model, cfg, (8, 8, 2), mesh, sigma_mids, 1.0)(
          params, jax.random.PRNGKey(5), jnp.asarray(idx)
        )
      ),
    )


def test_guidance_needs_a_conditional_network():
  apply = lambda x, n, y: x  # noqa: E731
  with pytest.raises(ValueError, match="cfg_scale=2.0"):
    sampling.guided(apply, 0, None, 2.0)


def test_sampler_specs_count_guided_evaluations_twice():
  plain, two = sampling.sweep((0.821,))
  assert (plain.nfe, plain.name, two.nfe, two.name) == (1, "nfe1", 2, "nfe2_sigma0.821")
  one_g, two_g = sampling.sweep((0.821,), 1.5)
  assert (one_g.nfe, one_g.steps, one_g.name) == (2, 1, "nfe2_cfg1.5")
  assert (two_g.nfe, two_g.steps, two_g.name) == (4, 2, "nfe4_sigma0.821_cfg1.5")
  assert two_g.fields()["cfg_scale"] == 1.5


def test_class_grid_has_one_row_per_class():
  n, k = 23, 5
  images = np.zeros((n, 2, 3, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(n)  # each image carries its sample index
  grid = summaries.sample_grid(images, k)
  assert grid.shape == (k * 2, (n // k) * 3, 3)
  for row in range(k):
    for col in range(n // k):
      index = grid[row * 2, col * 3, 0]
      assert index % k == row and index == row + col * k
  # Unconditional, one chosen class, or fewer samples than classes: in order.
  np.testing.assert_array_equal(summaries.sample_grid(images), summaries.image_grid(images))
  np.testing.assert_array_equal(summaries.sample_grid(images, k, 2), summaries.image_grid(images))


def test_schema_names_the_conditioning_keys():
  config = dit_config()
  config.data.num_classes = 0
  config.eval.cfg_scale = 2.0
  config.eval.class_label = 1
  config.model.label_dropout = 1.0
  config.model.dit_size = "Q/3"
  config.mesh.fsdp = 3
  with pytest.raises(schema.ConfigError) as info:
    schema.check_train(config, 8)
  text = str(info.value)
  keys = ("eval.cfg_scale", "eval.class_label", "model.label_dropout", "model.dit_size")
  for key in keys + ("mesh.fsdp",):
    assert f"config.{key}=" in text, key
  config = dit_config()
  config.data.latent_shape = (9, 9, 2)
  with pytest.raises(schema.ConfigError, match="patch size 2"):
    schema.check_train(config, 1)
  config = dit_config()
  config.eval.class_label = K
  with pytest.raises(schema.ConfigError, match="eval.class_label"):
    schema.check_train(config, 1)


def test_conditional_unet_adds_one_table_row_per_class_to_its_embedding():
  """The UNet's label term: emb = map_layer1(...) + table[y] before the last SiLU (EDM's place)."""
  config = test_config.get_config()
  config.data.num_classes = K
  model = config_lib.build_model(config)
  plain = config_lib.build_model(test_config.get_config())
  x, noise = jnp.zeros((2, 8, 8, 2)), jnp.zeros((2,))
  labels = jnp.asarray([0, K], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, noise, labels, train=False)["params"]
  base = plain.init(jax.random.PRNGKey(0), x, noise, train=False)["params"]
  count = lambda p: sum(v.size for v in jax.tree.leaves(p))  # noqa: E731
  emb = 4 * config.model.model_channels
  assert count(params) - count(base) == (K + 1) * emb
  table = np.asarray(params["map_label"]["embedding"])
  assert table.shape == (K + 1, emb) and 0.8 < table.std() < 1.2  # EDM's N(0, 1) rows
  # With the table zeroed the network is the unconditional one with the same weights.
  zeroed = dict(params, map_label={"embedding": jnp.zeros_like(table)})
  same = {k: v for k, v in zeroed.items() if k != "map_label"}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 2)), jnp.float32)
  noise = jnp.asarray([1.0, -3.0])
  # Random output conv so that the output is not identically zero.
  out_conv = jax.tree.map(lambda v: 0.1 * jnp.ones_like(v), params["out_conv"])
  zeroed["out_conv"] = same["out_conv"] = out_conv
  np.testing.assert_allclose(
    model.apply({"params": zeroed}, x, noise, labels, train=False),
    plain.apply({"params": same}, x, noise, train=False),
    rtol=1e-5,
    atol=1e-6,
  )
  # And the label changes the output (random weights: the zero-initialised convs hide the
  # embedding at init).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  moved = [0.2 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)]
  moved = jax.tree.unflatten(tree, moved)
  a = model.apply({"params": moved}, x, noise, labels, train=False)
  b = model.apply({"params": moved}, x, noise, labels[::-1], train=False)
  assert float(jnp.abs(a - b).max()) > 1e-4

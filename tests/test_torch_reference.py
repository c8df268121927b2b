"""The PyTorch re-implementation in benchmarks/torch_unet.py computes what lct_jax computes.

It is the PyTorch side of the CPU comparison (benchmarks/cpu_flags.py --torch_step), so it must
be the same network and loss: with the same (random, non-trivial) weights, its float64 outputs,
losses and gradients must match the Flax network's. Needs torch (requirements-torch.txt).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lct_jax.core import karras, losses
from lct_jax.core.models.unet import DhariwalUNet
from tests.test_unet import random_params, rel_err

torch = pytest.importorskip("torch")
torch_unet = pytest.importorskip("benchmarks.torch_unet")

# Two heads of 64 channels at 4x4 (their channel order matters), GroupNorm inside.
SMALL = dict(
  img_resolution=8,
  in_channels=4,
  out_channels=4,
  model_channels=32,
  channel_mult=(1, 4),
  num_blocks=1,
  attn_resolutions=(4,),
)


def _pair(final_norm, nsln_everywhere, seed):
  kw = dict(SMALL, final_norm=final_norm, nsln_everywhere=nsln_everywhere)
  model = DhariwalUNet(**kw, attention_impl="xla")
  x = jnp.zeros((2, 8, 8, 4))
  params = random_params(model, x, jnp.zeros((2,)), train=False, seed=seed)
  kw.pop("out_channels")
  res, cin = kw.pop("img_resolution"), kw.pop("in_channels")
  net = torch_unet.DhariwalUNet(res, cin, cin, **kw).double()
  torch_unet.load_flax_params(net, params)
  return model, params, net


def _nchw(a):
  return torch.from_numpy(np.asarray(a, np.float64).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize(
  "final_norm, nsln_everywhere", [("nsln", False), ("group", False), ("layer", True)]
)
def test_network_output_matches_flax(final_norm, nsln_everywhere):
  model, params, net = _pair(final_norm, nsln_everywhere, seed=1)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  labels = np.array([-300.0, 10.0, 700.0], np.float32)
  want = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(labels), train=False)
  got = net(_nchw(x), torch.from_numpy(labels.astype(np.float64))).detach().numpy()
  assert got.shape == (3, 4, 8, 8)
  assert rel_err(np.asarray(want).transpose(0, 3, 1, 2), got) < 2e-5


def test_step_loss_and_gradient_match_flax():
  model, params, net = _pair("nsln", False, seed=2)
  rng = np.random.default_rng(3)
  b = 4
  x = rng.normal(size=(b, 8, 8, 4)).astype(np.float32)
  noise = rng.normal(size=(b, 8, 8, 4)).astype(np.float32)
  sigma = np.array([0.01, 0.3, 2.0, 40.0], np.float32)
  sigma_next = np.array([0.005, 0.2, 1.5, 25.0], np.float32)
  mask = np.array([True, True, False, False])
  c = np.float32(0.03456)
  noise_cfg = karras.NoiseConfig()

  def jax_loss(p):
    def f(xx, s):
      return karras.consistency_fn(
        lambda a, lab: model.apply({"params": p}, a, lab, train=False), xx, s, noise_cfg
      )

    bc = (b, 1, 1, 1)
    teacher = jax.lax.stop_gradient(f(x + sigma_next.reshape(bc) * noise, sigma_next))
    student = f(x + sigma.reshape(bc) * noise, sigma)
    ct = jnp.sum(losses.consistency_terms(student, teacher, sigma, sigma_next, c, "cauchy")) / b
    weight = 1.0 / sigma**2 + 1.0 / 0.25
    diff = losses.masked_mean(losses.diffusion_terms(student, x, weight), mask)
    return ct + 5.0 * diff

  want_loss, want_grads = jax.value_and_grad(jax_loss)(params)
  loss = torch_unet.step_loss(
    net,
    _nchw(x),
    _nchw(noise),
    torch.from_numpy(sigma.astype(np.float64)),
    torch.from_numpy(sigma_next.astype(np.float64)),
    torch.from_numpy(mask),
    torch.tensor(float(c), dtype=torch.float64),
  )
  loss.backward()
  assert math.isclose(float(loss.detach()), float(want_loss), rel_tol=1e-4)
  want = torch_unet.flax_to_torch(want_grads)
  got = {name: p.grad.numpy() for name, p in net.named_parameters()}
  assert set(got) == set(want)
  total = np.sqrt(sum(np.sum(np.square(g)) for g in want.values()))
  for name, g in want.items():
    # every gradient, including the zero-init layers' (non-zero here): error against the total
    assert np.linalg.norm(got[name] - g) < 1e-4 * total, name
  assert (
    rel_err(
      np.concatenate([got[n].ravel() for n in want]),
      np.concatenate([g.ravel() for g in want.values()]),
    )
    < 1e-4
  )


def test_paper_network_has_the_flax_parameter_count():
  from configs import ffhq
  from lct_jax import config_lib

  config = ffhq.get_config()
  model = config_lib.build_model(config)
  shapes = jax.eval_shape(
    lambda k: model.init(k, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), train=False),
    jax.random.key(0),
  )
  want = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  with torch.device("meta"):
    net = torch_unet.from_config(config.model, (32, 32, 4))
  assert sum(p.numel() for p in net.parameters()) == want


def test_load_rejects_a_foreign_tree():
  model, params, net = _pair("nsln", False, seed=4)
  params = dict(params)
  params["extra"] = {"kernel": np.zeros((1, 1, 4, 4), np.float32)}
  with pytest.raises(ValueError, match="only in Flax.*extra"):
    torch_unet.load_flax_params(net, params)


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_optimizer_matches_torch_radam(scale):
  """lct_jax's optimizer (docs/method.md §5.1) against torch.optim.RAdam, the authors' optimizer.

  Covers coupled weight decay, the rectification switching on at t = 6, and eps = 1e-8 where torch
  puts it (at gradients of 1e-7 it is not negligible).
  """
  from lct_jax.core import train

  lr, wd = 1e-2, 0.1 * scale
  rng = np.random.default_rng(1)
  theta0 = rng.normal(size=(3, 5))
  grads = [scale * rng.normal(size=(3, 5)) for _ in range(15)]
  p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
  opt = torch.optim.RAdam([p], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
  tx, _ = train.make_optimizer(train.OptimConfig(learning_rate=lr, weight_decay=wd, eps=1e-8))
  params = jnp.asarray(theta0, jnp.float32)
  state = tx.init(params)
  for g in grads:
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = params + updates
    want = p.detach().numpy()
    np.testing.assert_allclose(np.asarray(params) - theta0, want - theta0, rtol=1e-3, atol=5e-6)

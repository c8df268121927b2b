"""The paper network and its train step in PyTorch, to time the same work on the same CPU.

Not the authors' code (it is not reachable offline): a PyTorch re-implementation of lct_jax's
DhariwalUNet (`lct_jax/core/models`) and of one consistency-training step as
`lct_jax/core/train.py` runs it:

* exact OT coupling of the batch (scipy);
* a teacher forward without gradient at sigma_{i+1};
* the student's forward and backward at sigma_i;
* the Cauchy CT loss plus the early-timestep diffusion loss;
* RAdam with coupled weight decay, and the EMA.

It is the PyTorch baseline for the CPU step, timed in the same run as the JAX step
(`benchmarks/cpu_flags.py --torch_step`). tests/test_torch_reference.py checks that this network
and loss give the Flax network's outputs and gradients for the same weights.

Tensors are NCHW (run in channels_last memory); `load_flax_params` copies a Flax parameter tree in.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHANNELS_PER_HEAD = 64


def _uniform_(t: torch.Tensor, fan_in: int, zero: bool) -> None:
  """EDM's kaiming-uniform init with gain sqrt(1/3) (bound 1/sqrt(fan_in)), or zeros."""
  with torch.no_grad():
    if zero:
      t.zero_()
    else:
      t.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))


class Linear(nn.Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(cout, cin))
    self.bias = nn.Parameter(torch.empty(cout))
    _uniform_(self.weight, cin, False)
    _uniform_(self.bias, cin, False)

  def forward(self, x):
    return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
  """Optional nearest-2x up / 2x2-mean down, then a k x k 'same' convolution (k = 0: none)."""

  def __init__(self, cin, cout, k, up=False, down=False, zero=False):
    super().__init__()
    self.up, self.down, self.k = up, down, k
    if k:
      self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
      self.bias = nn.Parameter(torch.empty(cout))
      _uniform_(self.weight, cin * k * k, zero)
      _uniform_(self.bias, cin * k * k, zero)

  def forward(self, x):
    if self.up:
      x = F.interpolate(x, scale_factor=2, mode="nearest")
    if self.down:
      x = F.avg_pool2d(x, 2)
    return F.conv2d(x, self.weight, self.bias, padding=self.k // 2) if self.k else x


class GroupNorm(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.groups = min(32, c // 4)
    self.weight = nn.Parameter(torch.ones(c))
    self.bias = nn.Parameter(torch.zeros(c))

  def forward(self, x):
    return F.group_norm(x, self.groups, self.weight, self.bias, eps=1e-5)


class LayerNorm(nn.Module):
  """Over (C, H, W) per sample; `use_scale=False` is the paper's Non-scaling LayerNorm."""

  def __init__(self, c, res, use_scale):
    super().__init__()
    self.shape = (c, res, res)
    self.weight = nn.Parameter(torch.ones(self.shape)) if use_scale else None
    self.bias = nn.Parameter(torch.zeros(self.shape))

  def forward(self, x):
    return F.layer_norm(x, self.shape, self.weight, self.bias, eps=1e-5)


def make_norm(kind: str, c: int, res: int) -> nn.Module:
  if kind == "group":
    return GroupNorm(c)
  if kind in ("layer", "nsln"):
    return LayerNorm(c, res, use_scale=kind == "layer")
  raise ValueError(f"unknown norm kind {kind!r}")


class SelfAttention(nn.Module):
  """x + proj(attention(qkv(norm2(x)))); qkv channels ordered (head, channel-in-head, {q, k, v})."""

  def __init__(self, c, heads, norm, res):
    super().__init__()
    self.heads = heads
    self.norm2 = make_norm(norm, c, res)
    self.qkv = Conv2d(c, 3 * c, 1)
    self.proj = Conv2d(c, c, 1, zero=True)

  def forward(self, x):
    b, c, h, w = x.shape
    qkv = self.qkv(self.norm2(x)).reshape(b, self.heads, c // self.heads, 3, h * w)
    q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))  # (B, heads, HW, d)
    a = F.scaled_dot_product_attention(q, k, v)
    return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class UNetBlock(nn.Module):
  def __init__(self, cin, cout, emb, res_in, up=False, down=False, attention=False, norm="group"):
    super().__init__()
    res = res_in * 2 if up else res_in // 2 if down else res_in
    self.norm0 = make_norm(norm, cin, res_in)
    self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
    self.affine = Linear(emb, 2 * cout)
    self.norm1 = make_norm(norm, cout, res)
    self.conv1 = Conv2d(cout, cout, 3, zero=True)
    self.skip = None
    if cout != cin:
      self.skip = Conv2d(cin, cout, 1, up=up, down=down)
    elif up or down:
      self.skip = Conv2d(cin, cout, 0, up=up, down=down)
    heads = cout // CHANNELS_PER_HEAD if attention else 0
    self.attn = SelfAttention(cout, heads, norm, res) if heads else None

  def forward(self, x, emb):
    h = self.conv0(F.silu(self.norm0(x)))
    scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(shift + self.norm1(h) * (scale + 1.0))
    h = self.conv1(h)  # dropout 0 (the paper configs)
    x = h + (self.skip(x) if self.skip is not None else x)
    return self.attn(x) if self.attn is not None else x


class DhariwalUNet(nn.Module):
  """The same network as `lct_jax.core.models.unet.DhariwalUNet` (no dropout), NCHW."""

  def __init__(
    self,
    img_resolution,
    in_channels,
    out_channels,
    model_channels,
    channel_mult,
    num_blocks,
    attn_resolutions,
    final_norm="nsln",
    nsln_everywhere=False,
  ):
    super().__init__()
    mc, emb = model_channels, 4 * model_channels
    norm = "nsln" if nsln_everywhere else "group"
    self.model_channels = mc
    self.map_layer0, self.map_layer1 = Linear(mc, emb), Linear(emb, emb)
    self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
    cout, skips = in_channels, []
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      tag = f"{res}x{res}"
      if level == 0:
        self.enc[f"enc_{tag}_conv"] = Conv2d(cout, mc * mult, 3)
        cout = mc * mult
      else:
        self.enc[f"enc_{tag}_down"] = UNetBlock(cout, cout, emb, 2 * res, down=True, norm=norm)
      skips.append(cout)
      for idx in range(num_blocks):
        attn = res in attn_resolutions
        self.enc[f"enc_{tag}_block{idx}"] = UNetBlock(
          cout, mc * mult, emb, res, attention=attn, norm=norm
        )
        cout = mc * mult
        skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      tag = f"{res}x{res}"
      if level == len(channel_mult) - 1:
        self.dec[f"dec_{tag}_in0"] = UNetBlock(cout, cout, emb, res, attention=True, norm=norm)
        self.dec[f"dec_{tag}_in1"] = UNetBlock(cout, cout, emb, res, norm=norm)
      else:
        self.dec[f"dec_{tag}_up"] = UNetBlock(cout, cout, emb, res // 2, up=True, norm=norm)
      for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), mc * mult
        attn = res in attn_resolutions
        self.dec[f"dec_{tag}_block{idx}"] = UNetBlock(
          cin, cout, emb, res, attention=attn, norm=norm
        )
    self.out_norm = make_norm(final_norm, cout, img_resolution)
    self.out_conv = Conv2d(cout, out_channels, 3, zero=True)

  def forward(self, x, noise_labels):
    half = self.model_channels // 2
    freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)
    arg = noise_labels.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).to(x.dtype)
    emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
    h, skips = x, []
    for name, module in self.enc.items():
      h = module(h) if name.endswith("_conv") else module(h, emb)
      skips.append(h)
    for name, module in self.dec.items():
      if "_block" in name:
        h = torch.cat([h, skips.pop()], dim=1)
      h = module(h, emb)
    return self.out_conv(F.silu(self.out_norm(h)))


def from_config(model_cfg, latent_shape) -> DhariwalUNet:
  """The torch network of an lct_jax config's `model` block for latents (H, W, C)."""
  res, _, channels = latent_shape
  return DhariwalUNet(
    res,
    channels,
    channels,
    model_cfg.model_channels,
    tuple(model_cfg.channel_mult),
    model_cfg.num_blocks,
    tuple(model_cfg.attn_resolutions),
    final_norm=model_cfg.final_norm,
    nsln_everywhere=model_cfg.nsln_everywhere,
  )


def flax_to_torch(params) -> dict[str, np.ndarray]:
  """A Flax DhariwalUNet parameter (or gradient) tree as {torch parameter name: float64 array}."""
  out = {}

  def visit(tree, path):
    for key, value in tree.items():
      if hasattr(value, "items"):
        visit(value, path + [key])
        continue
      a = np.asarray(value, np.float64)
      if key == "kernel":  # HWIO -> OIHW, (in, out) -> (out, in)
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
      elif a.ndim == 3:  # a LayerNorm's (H, W, C) scale or shift
        a = a.transpose(2, 0, 1)
      top = (
        ("enc",) if path[0].startswith("enc_") else ("dec",) if path[0].startswith("dec_") else ()
      )
      out[".".join(top + tuple(path) + ("bias" if key == "bias" else "weight",))] = a

  visit(params, [])
  return out


def load_flax_params(net: DhariwalUNet, params) -> None:
  """Copies a Flax DhariwalUNet parameter tree (HWIO kernels) into `net`; every name must match."""
  arrays = flax_to_torch(params)
  named = dict(net.named_parameters())
  if set(arrays) != set(named):
    raise ValueError(
      f"parameter names differ: only in Flax {sorted(set(arrays) - set(named))}, "
      f"only in torch {sorted(set(named) - set(arrays))}"
    )
  with torch.no_grad():
    for name, a in arrays.items():
      if tuple(named[name].shape) != a.shape:
        raise ValueError(f"{name}: Flax shape {a.shape} != torch {tuple(named[name].shape)}")
      named[name].copy_(torch.from_numpy(a))


def consistency_fn(net, x, sigma, sigma_min=0.002, sigma_data=0.5):
  """f(x, sigma) = c_skip x + c_out F(c_in x, 250 ln sigma) (lct_jax.core.karras)."""
  s = sigma.view(-1, 1, 1, 1)
  sd2 = sigma_data**2
  shifted = s - sigma_min
  c_skip = sd2 / (shifted**2 + sd2)
  c_out = sigma_data * shifted / torch.sqrt(s**2 + sd2)
  c_in = 1.0 / torch.sqrt(s**2 + sd2)
  return c_skip * x + c_out * net(c_in * x, 250.0 * torch.log(sigma))


def step_loss(net, x, noise, sigma, sigma_next, mask, c, diffusion_weight=5.0, sigma_data=0.5):
  """The Cauchy CT loss (teacher without gradient) plus the masked early-timestep diffusion loss."""
  with torch.no_grad():
    teacher = consistency_fn(net, x + sigma_next.view(-1, 1, 1, 1) * noise, sigma_next)
  student = consistency_fn(net, x + sigma.view(-1, 1, 1, 1) * noise, sigma)
  r2 = (student - teacher).square().mean(dim=(1, 2, 3))
  ct = (torch.log1p(r2 / (2.0 * c**2)) / (sigma - sigma_next)).sum() / x.shape[0]
  weight = 1.0 / sigma**2 + 1.0 / sigma_data**2
  terms = weight * (student - x).square().mean(dim=(1, 2, 3))
  diff = torch.where(mask, terms, 0.0).sum() / mask.sum().clamp(min=1)
  return ct + diffusion_weight * diff


class TrainStep:
  """One step as lct_jax's: coupling, loss, gradient, non-finite check, RAdam, EMA."""

  def __init__(self, net, lr=1e-4, weight_decay=1e-4, ema_decay=0.9999):
    self.net = net
    self.params = [p for p in net.parameters()]
    self.opt = torch.optim.RAdam(
      self.params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_decay = ema_decay

  def __call__(self, x, noise, sigma, sigma_next, mask, c) -> float:
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.flatten(1), noise.flatten(1)).square()
    _, perm = linear_sum_assignment(cost.numpy())
    noise = noise[torch.from_numpy(perm)]
    self.opt.zero_grad(set_to_none=True)
    loss = step_loss(self.net, x, noise, sigma, sigma_next, mask, c)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(
      torch.stack(torch._foreach_norm([p.grad for p in self.params]))
    )
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
      self.opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
    return float(loss.detach())


def draw_step_inputs(rng, batch, latent_shape, cfg, step=0):
  """Noise, interval sigmas, diffusion mask and c of training step `step` as torch NCHW tensors,
  drawn with lct_jax's own curriculum (`cfg`: a `curriculum.CurriculumConfig`) on the host."""
  from lct_jax.core import curriculum, karras  # noqa: PLC0415 - jax only where inputs are drawn

  n = int(curriculum.num_scales(step, cfg))
  probs = np.exp(np.asarray(curriculum.interval_log_probs(n, cfg), np.float64))[: n - 1]
  i = rng.choice(n - 1, size=batch, p=probs / probs.sum())
  grid = np.asarray(karras.karras_sigma(np.arange(n), n, cfg.noise))
  h, w, ch = latent_shape
  return dict(
    noise=torch.from_numpy(rng.standard_normal((batch, ch, h, w)).astype(np.float32)),
    sigma=torch.from_numpy(grid[i]),
    sigma_next=torch.from_numpy(grid[i + 1]),
    mask=torch.from_numpy(np.array(curriculum.diffusion_mask(i, n, cfg))),
    c=torch.tensor(float(curriculum.scale_c(n, cfg))),
  )

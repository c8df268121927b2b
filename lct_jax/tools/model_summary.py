"""`python -m lct_jax.tools.model_summary --config=configs/ffhq.py`: the network's parameter table.

Shapes come from jax.eval_shape, so the paper network is summarised without allocating its weights.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from clu import parameter_overview
from ml_collections import config_flags

from lct_jax import config_lib, schema
from lct_jax.core import train
from lct_jax.io import job_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)


def param_shapes(config):
  """The parameter pytree of config.model as ShapeDtypeStructs."""
  model = config_lib.build_model(config)
  x = jnp.zeros((1, *config_lib.example_shape(config)), jnp.float32)
  labels = train.example_labels(model, 1)
  variables = jax.eval_shape(
    lambda k: model.init({"params": k}, x, jnp.zeros((1,)), labels, train=False),
    jax.random.PRNGKey(0),
  )
  return variables["params"]


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))


def main(argv):
  del argv
  config = _CONFIG.value
  schema.check_train(config)
  params = param_shapes(config)
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  sys.stdout.write(table + f"\nTotal parameters: {count_params(params):,}\n")


if __name__ == "__main__":
  job_logging.run(main, "lct_jax.tools.model_summary", required=["config"])

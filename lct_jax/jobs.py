"""The start-up the three jobs share: `setup_job(config, workdir, job)`.

In order, before anything is written: the path checks (URLs and files refused), the distributed
start (multi-host), the device mesh, every config check of the job at once (`lct_jax.schema`),
then the latent dataset and its statistics. The binaries parse flags and call the job's library
function, which starts with this.
"""

import dataclasses
import os

import ml_collections
from absl import logging
from jax.sharding import Mesh

from lct_jax import schema
from lct_jax.core import mesh as mesh_lib
from lct_jax.io import encode_config, encoding, latent_dataset, latents

JOBS = ("train", "eval", "encode")


@dataclasses.dataclass(frozen=True)
class JobSetup:
  """What a job starts from."""

  mesh: Mesh | None  # None for the encode job (it shards each batch over the local devices)
  data_dir: str  # the latent dataset: data.dir, or the encode job's output_dir
  # The dataset's statistics for data.latent / data.use_flipped / data.normalization (train and
  # eval); compare them with the autoencoder with latents.check_compatible.
  latent_stats: latents.LatentStats | None


def _start_distributed(keys: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize from `distributed`, `coordinator_address`, ... when asked."""
  if keys.distributed:
    mesh_lib.initialize_distributed(
      keys.coordinator_address, keys.num_processes, keys.process_id, keys.cpu_collectives
    )


def setup_job(
  config: ml_collections.ConfigDict, workdir: str, job: str, mesh: Mesh | None = None
) -> JobSetup:
  """Checks the paths and the config of `job`, starts the devices, and finds the latent data.

  Args:
    config: the training config (train, eval) or the encode config (encode).
    workdir: the training run's folder (train, eval); unused for encode.
    job: "train", "eval" or "encode".
    mesh: devices the caller has set up (training's final evaluation); None starts the
      distributed system if configured and makes the mesh of config.mesh.num_devices.

  Raises:
    schema.ConfigError: every config problem of the job, one line each.
    ValueError, NotADirectoryError, FileNotFoundError: a URL, a workdir that is a file, a
      missing dataset.
  """
  if job not in JOBS:
    raise ValueError(f"job={job!r}: expected one of {', '.join(JOBS)}")
  if job == "encode":
    schema.check_encode(config)
    schema.check_local_path("config.output_dir", config.output_dir)
    _start_distributed(config)
    return JobSetup(None, config.output_dir, None)
  schema.check_workdir(workdir)
  schema.check_local_path("config.data.dir", config.data.dir)
  if mesh is None:
    _start_distributed(config.mesh)
    mesh = mesh_lib.make_mesh(config.mesh.num_devices, config.mesh.fsdp)
  checks = schema.Checks()
  # The eval job may run on another device count than the training: no batch divisibility.
  schema.check_train(config, mesh.size if job == "train" else None, checks)
  if job == "eval" or config.eval.after_training:  # training's final evaluation fails now
    schema.check_eval(config, mesh.size, checks)
  checks.raise_any()
  data_dir = ensure_dataset(config) if job == "train" else os.path.expanduser(config.data.dir)
  stats = latents.load_latent_stats(
    data_dir,
    use_flipped=config.data.use_flipped,
    latent=config.data.latent,
    normalization=config.data.normalization,
  )
  return JobSetup(mesh, data_dir, stats)


def ensure_dataset(config: ml_collections.ConfigDict) -> str:
  """data.dir, encoded first with data.encode_config when it holds no finished dataset."""
  data_dir = os.path.expanduser(config.data.dir)
  if not data_dir:
    raise ValueError("config.data.dir is empty: point it at the encode job's output folder")
  if latent_dataset.is_complete(data_dir):
    return data_dir
  if not config.data.encode_config:
    raise FileNotFoundError(
      f"config.data.dir={data_dir!r} holds no finished latent dataset; create it with "
      "python -m lct_jax.encode --config=configs/encode/<name>.py "
      f"--config.output_dir={data_dir}"
    )
  encode_cfg = encode_config.load_config_file(config.data.encode_config, "data.encode_config")
  encode_cfg.output_dir = data_dir
  schema.check_encode(encode_cfg)
  logging.info("Encoding %s into %s first.", config.data.encode_config, data_dir)
  encoding.encode_dataset(encode_cfg)
  return data_dir

"""Device mesh and shardings: one data-parallel axis named "data" (jit + NamedSharding, no pmap)."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (-1: all), axis "data", automatic sharding."""
  devices = jax.devices()
  if num_devices == 0 or num_devices < -1:
    raise ValueError(f"config.mesh.num_devices={num_devices}: use -1 (all devices) or a count >= 1")
  if num_devices > len(devices):
    raise ValueError(f"config.mesh.num_devices={num_devices} but only {len(devices)} devices exist")
  if num_devices > 0:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value held whole on every device (params, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over "data"."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def initialize_distributed(
  coordinator_address: str = "",
  num_processes: int = -1,
  process_id: int = -1,
  cpu_collectives: str = "",
) -> None:
  """jax.distributed.initialize() for multi-host runs; called by the jobs, never at import.

  Args:
    coordinator_address: "host:port", or "" to let JAX detect it (TPU pods, SLURM).
    num_processes: -1 to detect.
    process_id: -1 to detect.
    cpu_collectives: "gloo" for several CPU processes on one machine (tests); "" otherwise.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes > 0:
    kwargs["num_processes"] = num_processes
  if process_id >= 0:
    kwargs["process_id"] = process_id
  jax.distributed.initialize(**kwargs)

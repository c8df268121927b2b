"""Device mesh and shardings (jit + NamedSharding, no pmap).

The mesh has two axes, "data" and "fsdp" (docs/design.md, "Sharding"):

- a batch is split over both axes together: every device holds B / (number of devices) rows;
- the train state (params, EMA, optimizer moments) is split over "fsdp" (`state_sharding`) and
  held whole along "data". With fsdp = 1 (the default) the state is replicated: plain data
  parallelism.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(num_devices: int = -1, fsdp: int = 1) -> Mesh:
  """A (num_devices / fsdp, fsdp) mesh over the first `num_devices` devices (-1: all), axes
  ("data", "fsdp"), automatic sharding."""
  devices = jax.devices()
  if num_devices == 0 or num_devices < -1:
    raise ValueError(f"config.mesh.num_devices={num_devices}: use -1 (all devices) or a count >= 1")
  if num_devices > len(devices):
    raise ValueError(f"config.mesh.num_devices={num_devices} but only {len(devices)} devices exist")
  if num_devices > 0:
    devices = devices[:num_devices]
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(
      f"config.mesh.fsdp={fsdp}: must be >= 1 and divide the {len(devices)} devices of the mesh"
    )
  grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value held whole on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over every axis of the mesh."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  """How one state array splits over an "fsdp" axis of size `fsdp`.

  Its largest dimension divisible by `fsdp` is split (the later one on a tie); an array with no
  such dimension (scalars, small biases) is replicated.
  """
  if fsdp == 1:
    return PartitionSpec()
  fits = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not fits:
    return PartitionSpec()
  _, axis = max(fits)
  return PartitionSpec(*([None] * axis + [FSDP_AXIS]))


def state_sharding(mesh: Mesh, tree: Any) -> Any:
  """Shardings of a pytree of arrays (or ShapeDtypeStructs) for the train state on `mesh`."""
  fsdp = int(mesh.shape.get(FSDP_AXIS, 1))
  return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(tuple(leaf.shape), fsdp)), tree)


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

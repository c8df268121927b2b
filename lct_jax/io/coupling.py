"""The global exact OT coupling solved on the host one step ahead of the train step.

Owns `HostCoupledBatches`, which wraps the training job's data iterator (`GlobalBatches`, or
anything with its protocol: `next_batch`, `wait_s`, `get_state` / `set_state`). Needs only jax,
numpy, scipy and the core layer, so the train-step benchmark runs it on a bare accelerator box.
"""

import concurrent.futures
import json
import time
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from lct_jax.core import mesh as mesh_lib
from lct_jax.core import ot


class HostCoupledBatches:
  """Global batches carrying their exact global OT coupling, solved on the host one step ahead.

  With ot.method="exact" and ot.scope="global" the coupling is a B x B assignment that scipy
  solves on the host (tens of ms at B = 1024). Inside the train step the device would wait for it
  every step. Here, before batch n is handed to step n, batch n + 1 is read and its cost matrix
  (`train.make_coupling_cost`, the same noise and cost the step would use) is queued on the device
  ahead of step n; a host thread fetches it and solves it while the device runs step n. Batch n
  carries its permutation as `ot_perm`. The result equals the in-step coupling.

  Batch n is the one step n consumes (the data iterator's count equals the step after a restore),
  so it also names the step whose noise it is coupled with. The state saved in checkpoints is the
  number of batches handed to the step, as for `GlobalBatches` (the read-ahead batch is read again
  after a restore), so checkpoints are interchangeable between the two.
  """

  def __init__(self, batches, cost_fn, key: jax.Array, mesh: Mesh):
    """`cost_fn` from `train.make_coupling_cost`; `key` is the train state's key."""
    self._batches = batches
    self._cost_fn = cost_fn
    self._sharding = mesh_lib.batch_sharding(mesh)
    # A copy: the train step donates the state, and with it the state's own key array.
    host_key = np.asarray(jax.device_get(key))
    self._key = jax.make_array_from_callback(
      host_key.shape, mesh_lib.replicated(mesh), lambda idx: host_key[idx]
    )
    self._solve = ot.exact_assignment_host
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ot_coupling")
    self._ahead = None  # (batch, future of its permutation)
    self.solve_wait_s = 0.0  # host time the loop waited for a solve (not hidden by the device)

  @property
  def wait_s(self) -> float:
    """Host time spent waiting for data, the coupling included."""
    return self._batches.wait_s + self.solve_wait_s

  @property
  def next_batch(self) -> int:
    return self._batches.next_batch - (self._ahead is not None)

  def _read_and_launch(self):
    n = self._batches.next_batch
    batch = next(self._batches)
    cost = self._cost_fn(self._key, np.int32(n), batch["x"])
    return batch, self._pool.submit(lambda: self._solve(np.asarray(jax.device_get(cost))))

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._ahead is None:
      self._ahead = self._read_and_launch()
    batch, solving = self._ahead
    self._ahead = self._read_and_launch()  # queued on the device before this batch's step
    t0 = time.perf_counter()
    perm = solving.result()
    self.solve_wait_s += time.perf_counter() - t0
    ot_perm = jax.make_array_from_callback(perm.shape, self._sharding, lambda idx: perm[idx])
    return dict(batch, ot_perm=ot_perm)

  def get_state(self) -> bytes:
    return json.dumps({"next_batch": self.next_batch}).encode()

  def set_state(self, state: bytes) -> None:
    self._ahead = None
    self._batches.set_state(state)

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)

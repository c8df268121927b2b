"""The exact OT coupling solved on the host one step ahead of the train step.

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
  """Global batches carrying their exact OT coupling, solved on the host one step ahead.

  With ot.method="exact" the coupling is an assignment that scipy solves on the host: one B x B
  problem (scope "global"; tens of ms at B = 1024) or one per device's shard (scope "local";
  about 1.5 ms at 128 rows). Solved inside the train step, it would leave the device idle every
  step, from the callback until the host has launched the rest of the step. Instead, before batch
  n is handed to step n:

  * batch n + 1 is read;
  * its cost matrices are queued on the device ahead of step n (`train.make_coupling_cost`: the
    same noise and cost the step would use);
  * a host thread fetches and solves them while the device runs step n (scope "local": only the
    blocks of this process's devices).

  Batch n carries its permutation as `ot_perm` (`ot.apply_permutation`). The result equals the
  in-step coupling.

  Batch n is the one step n consumes (the data iterator's count equals the step after a restore),
  so it also names the step whose noise it is coupled with. The state saved in checkpoints is the
  number of batches handed to the step, as for `GlobalBatches`; the read-ahead batch is read
  again after a restore. So checkpoints are interchangeable between the two.
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
    # Host time the loop waited for a solve once its cost matrix had reached the host. Waiting for
    # the matrix itself is waiting for the device to finish earlier steps (it is queued behind
    # them when the loop runs ahead): backpressure, not data, so not counted.
    self.solve_wait_s = 0.0

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
    return batch, self._pool.submit(self._solve_rows, cost)

  def _solve_rows(self, cost: jax.Array) -> tuple[dict[int, np.ndarray], float]:
    """{first batch row: its rows' permutation entries} for the rows this process holds, and the
    time the cost matrices were on the host."""
    if cost.ndim == 2:  # scope "global": one replicated (B, B) problem, solved by every process
      blocks = {0: np.asarray(jax.device_get(cost))}
    else:  # scope "local": (S, b, b), one block per data shard
      blocks = {}
      for shard in cost.addressable_shards:
        first = shard.index[0].start or 0
        for j, block in enumerate(np.asarray(shard.data)):
          blocks.setdefault((first + j) * block.shape[0], block)
    fetched = time.perf_counter()
    return {row: self._solve(block) for row, block in blocks.items()}, fetched

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._ahead is None:
      self._ahead = self._read_and_launch()
    batch, solving = self._ahead
    self._ahead = self._read_and_launch()  # queued on the device before this batch's step
    t0 = time.perf_counter()
    solved, fetched = solving.result()
    self.solve_wait_s += time.perf_counter() - max(t0, fetched)
    rows = batch["x"].shape[0]

    def rows_of(idx):
      start, stop, _ = idx[0].indices(rows)
      parts, row = [], start
      while row < stop:  # the solved pieces that cover [start, stop)
        first = max(f for f in solved if f <= row)
        piece = solved[first][row - first : stop - first]
        parts.append(piece)
        row += len(piece)
      return np.concatenate(parts).astype(np.int32)

    ot_perm = jax.make_array_from_callback((rows,), self._sharding, rows_of)
    return dict(batch, ot_perm=ot_perm)

  def get_state(self) -> bytes:
    return json.dumps({"next_batch": self.next_batch}).encode()

  def set_state(self, state: bytes) -> None:
    self._ahead = None
    self._batches.set_state(state)

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)
    if hasattr(self._batches, "close"):
      self._batches.close()

"""orbax checkpoints of a training run: train state plus data-iterator state, resumable anywhere.

Owns `Checkpointer`: an async `CheckpointManager` in `workdir/checkpoints` keeping the newest
`ckpt.keep` plus every `ckpt.keep_every`-th step. orbax writes each step under a temporary name and
renames it when complete, so a process killed during a save leaves nothing that a restore picks up.
The state restores into abstract arrays that carry the new mesh's shardings, so a run can resume on
another device count. Preemption (SIGTERM, or orbax's `reached_preemption`) is reported by
`should_stop` and ends in a final save.
"""

import os
import signal
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores {"state": TrainState, "data": iterator state} by step."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, keep_every: int | None):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, every_steps),
      max_to_keep=max(1, keep),
      keep_period=keep_every if keep_every and keep_every > 0 else None,
      enable_async_checkpointing=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._sigterm = False
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._sigterm = True

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, ascending."""
    return sorted(self.manager.all_steps())

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """Restores the state at `step` into `abstract_state`'s shardings; sets `data_iter`'s state."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    """Saves (asynchronously) if the interval policy or `force` says so; returns whether it did."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def should_stop(self, step: int) -> bool:
    """True once a SIGTERM arrived or orbax reports a preemption for `step`."""
    return self._sigterm or self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and restores the previous SIGTERM handler."""
    self.manager.wait_until_finished()
    self.manager.close()
    signal.signal(signal.SIGTERM, self._previous_handler)

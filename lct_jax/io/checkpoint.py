"""orbax checkpoints of a training run: train state plus data-iterator state, resumable anywhere.

Owns `Checkpointer`: an async `CheckpointManager` in `workdir/checkpoints` keeping the newest
`ckpt.keep` plus every `ckpt.keep_every`-th step. orbax writes each step under a temporary name and
renames it when complete, so a process killed during a save leaves nothing that a restore picks up.
The state restores into abstract arrays that carry the new mesh's shardings, so a run can resume on
another device count. Preemption is reported by `should_stop` and ends in a final save: SIGTERM
caught here in a single process; with several, JAX's preemption service (started by
jax.distributed.initialize) catches it and orbax's `reached_preemption` stops every process at the
same step. `CheckpointReader` is the read-only side for the eval job: it never writes, deletes or
cleans up anything and installs no signal handler, so it can follow a training job that is still
writing.
"""

import contextlib
import json
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

# The data iterator's position (`get_state()`, the same JSON on every process), saved once by the
# primary process, so a run resumes on any number of processes.
DATA_ITEM = "data_position"


class CheckpointShapeError(ValueError):
  """A saved array whose shape differs from the run's model (the message names it)."""


class CheckpointReadError(RuntimeError):
  """A checkpoint that cannot be read; the message names its step and folder, and the way back."""


@contextlib.contextmanager
def _reading(directory: str, step: int, steps: list[int], fallback: str):
  """Turns any failure to read checkpoint `step` into one CheckpointReadError naming it.

  `fallback` is how the job goes on without it, given the next older step ("{older}").
  """
  try:
    yield
  except CheckpointShapeError:
    raise
  except Exception as e:  # truncated or missing files: TensorStore, pytree, Zstd, JSON errors
    step_dir = os.path.join(directory, str(step))
    older = [s for s in steps if s < step]
    cause = " ".join(str(e).split())[:120]
    way_back = fallback.format(older=older[-1]) if older else "there is no older checkpoint"
    raise CheckpointReadError(
      f"checkpoint step {step} in {directory} cannot be read ({type(e).__name__}: {cause}); "
      f"{way_back}, or delete {step_dir}"
    ) from e


class Checkpointer:
  """Saves and restores {"state": TrainState, "data_position": iterator state} by step."""

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
    self._previous_handler = None
    # With several processes a handler here would replace JAX's (the preemption service's): a
    # process stopping on its own would leave the others waiting in their next collective.
    if jax.process_count() == 1:
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
    """Restores the state at `step` into `abstract_state`'s shardings; sets `data_iter`'s state.

    Raises:
      CheckpointShapeError: the saved arrays do not fit the run's model.
      CheckpointReadError: the checkpoint's files are damaged (truncated, missing).
    """
    corrupt = os.path.join(os.path.dirname(self.directory), f"corrupt_checkpoint_{step}")
    moved = f"mv {self.directory}/{step} {corrupt}"
    fallback = f"to resume from step {{older}}, move it aside ({moved})"
    with _reading(self.directory, step, self.all_steps(), fallback):
      check_shapes(self.directory, step, abstract_state)
      restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )
      position = data_position(self.directory, step)
    if data_iter is not None:
      data_iter.set_state(json.dumps(position).encode())
    return restored["state"]

  def due(self, step: int) -> bool:
    """Whether the interval policy saves `step` (the first save, then every ckpt.every_steps)."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    """Saves (asynchronously) if the interval policy or `force` says so; returns whether it did."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA_ITEM] = ocp.args.JsonSave(json.loads(data_iter.get_state()))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def should_stop(self, step: int) -> bool:
    """True once a SIGTERM arrived or orbax reports a preemption sync point at `step`.

    Every process must call this at every step (the sync point is agreed on by all of them).
    """
    return self._sigterm or self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and restores the previous SIGTERM handler."""
    self.manager.wait_until_finished()
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_shapes(directory: str, step: int, abstract: Any) -> None:
  """Raises CheckpointShapeError naming the first array whose saved shape differs from `abstract`'s.

  A model config other than the one the run was written with (channel counts, levels) otherwise
  fails deep in orbax without naming the array.
  Arrays absent from either side are left to orbax.
  """
  step_dir = os.path.join(directory, str(step))
  metadata = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
  saved = jax.tree_util.tree_flatten_with_path(getattr(metadata, "item_metadata", metadata))[0]
  shapes = {_key_names(p): tuple(leaf.shape) for p, leaf in saved if hasattr(leaf, "shape")}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = _key_names(path)
    if name in shapes and shapes[name] != tuple(leaf.shape):
      raise CheckpointShapeError(
        f"checkpoint {step_dir}: {'/'.join(name)} is {shapes[name]} there but {tuple(leaf.shape)} "
        "in this run's model; restore with the model config that wrote it (the run's "
        "config.json; e.g. model.model_channels, model.channel_mult)"
      )


def data_position(directory: str, step: int) -> dict[str, Any]:
  """The data-iterator position saved with complete checkpoint `step` in `directory`.

  Raises:
    FileNotFoundError: the checkpoint holds none (naming the folder).
  """
  step_dir = os.path.join(directory, str(step))
  path = os.path.join(step_dir, DATA_ITEM, "metadata")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  raise FileNotFoundError(f"{step_dir} holds no data-iterator position ({DATA_ITEM}/metadata)")


class CheckpointReader:
  """Read-only view of `workdir/checkpoints`: lists complete steps, restores parts of the state."""

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager: ocp.CheckpointManager | None = None

  def _open(self) -> ocp.CheckpointManager | None:
    if self._manager is None and os.path.isdir(self.directory):
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    return self._manager

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints on disk now (re-read each call), ascending."""
    manager = self._open()
    if manager is None:
      return []
    manager.reload()
    return sorted(manager.all_steps())

  def restore_fields(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restores only some fields of the saved TrainState (e.g. {"ema_params": ..., "step": ...}).

    Args:
      step: a step listed by `all_steps`.
      abstract: field name -> abstract pytree (jax.ShapeDtypeStruct leaves carrying shardings).

    Returns:
      field name -> restored arrays, in the shardings of `abstract`.
    """
    manager = self._open()
    if manager is None:
      raise FileNotFoundError(f"no checkpoints in {self.directory}")
    fallback = "score step {older} instead (--config.eval.checkpoint_step={older})"
    with _reading(self.directory, step, self.all_steps(), fallback):
      check_shapes(self.directory, step, abstract)
      item = ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      )
      return dict(manager.restore(step, args=ocp.args.Composite(state=item))["state"])

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()

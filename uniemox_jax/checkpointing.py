"""Checkpoints: orbax `CheckpointManager` holding the train state and the grain iterator state.

A checkpoint step directory appears under its final name only once completely written
(orbax writes to a temporary directory and renames it), so a process killed mid-save leaves
nothing that a restart could mistake for a checkpoint. Restore goes into an abstract tree that
carries the current mesh's shardings: a checkpoint saved on 8 devices restores on 4 or 1.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


class Checkpointer:
  """Saves and restores {state, data iterator} under `directory/<step>`."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               asynchronous: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, keep_period=keep_every or None,
        enable_async_checkpointing=asynchronous, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None) -> None:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The state at `step`, placed as `abstract_state`'s shardings say; the iterator (if
    given, and if the checkpoint has one) is moved to where it was at that step."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    saved = self._manager.item_metadata(step)
    if data_iterator is not None and saved is not None and DATA in saved:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

  def restore_as_saved(self, step: int) -> Any:
    """The state at `step` with the shardings it was saved with (same device count)."""
    return self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore()}))[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def split_checkpoint_path(path: str):
  """"<dir>/<step>" -> (dir, step); "<dir>" -> (dir, None) for its latest step."""
  path = os.path.abspath(path.rstrip("/"))
  base = os.path.basename(path)
  if base.isdigit():
    return os.path.dirname(path), int(base)
  return path, None


def open_for_restore(path: str):
  """A read-only Checkpointer over an explicit checkpoint path, and the step to restore."""
  directory, step = split_checkpoint_path(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist "
                            "(config.init.checkpoint)")
  ckpt = Checkpointer(directory, read_only=True, asynchronous=False)
  if step is None:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory} (config.init.checkpoint)")
  elif step not in ckpt.all_steps():
    raise FileNotFoundError(f"checkpoint step {step} is not in {directory}; it has "
                            f"{sorted(ckpt.all_steps())} (config.init.checkpoint)")
  return ckpt, step

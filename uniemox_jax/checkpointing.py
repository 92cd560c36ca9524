"""Checkpoints: orbax `CheckpointManager` holding the train state and the grain iterator state.

A checkpoint step directory appears under its final name only once completely written
(orbax writes to a temporary directory and renames it), so a process killed mid-save leaves
nothing that a restart could mistake for a checkpoint. Restore goes into an abstract tree that
carries the current mesh's shardings: a checkpoint saved on 8 devices restores on 4 or 1.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from uniemox_jax import storage

STATE, DATA, META = "state", "data", "meta"


class Checkpointer:
  """Saves and restores {state, data iterator} under `directory/<step>`."""

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0,
               asynchronous: bool = True, read_only: bool = False):
    self.directory = storage.absolute(directory)     # a local path or a gs:// URL
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, keep_period=keep_every or None,
        enable_async_checkpointing=asynchronous, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    # Handlers named up front: reading a step's metadata then knows every item (without
    # them orbax warns, on each resume, that items "could not be restored").
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                META: ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None,
           meta: Optional[Dict[str, Any]] = None) -> None:
    """`meta`: a JSON-able dict kept with the step (the task, the class names)."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items[META] = ocp.args.JsonSave(meta)
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
  path = storage.absolute(path.rstrip("/"))
  base = storage.basename(path)
  if base.isdigit():
    return storage.dirname(path), int(base)
  return path, None


def open_for_restore(path: str, flag: str = "config.init.checkpoint"):
  """A read-only Checkpointer over an explicit checkpoint path, and the step to restore.
  `flag` names where the path came from, for the error messages."""
  directory, step = split_checkpoint_path(path)
  if not storage.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist ({flag})")
  ckpt = Checkpointer(directory, read_only=True, asynchronous=False)
  if step is None:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory} ({flag})")
  elif step not in ckpt.all_steps():
    raise FileNotFoundError(f"checkpoint step {step} is not in {directory}; it has "
                            f"{sorted(ckpt.all_steps())} ({flag})")
  return ckpt, step


def resolve_step_dir(path: str, flag: str = "--checkpoint") -> str:
  """A step directory from "<dir>/<step>" or "<dir>" (its latest finished step)."""
  ckpt, step = open_for_restore(path, flag)
  ckpt.close()
  return storage.join(ckpt.directory, str(step))


def state_metadata(step_dir: str) -> Any:
  """The saved state's tree, with shapes and dtypes, read without loading any array."""
  path = epath.Path(storage.absolute(step_dir)) / STATE
  if not path.exists():
    raise FileNotFoundError(f"{step_dir} holds no train state (no '{STATE}' item)")
  return ocp.PyTreeCheckpointHandler().metadata(path).tree


def read_meta(step_dir: str) -> Dict[str, Any]:
  """The step's `meta` dict ({} for a checkpoint saved without one)."""
  path = storage.join(step_dir, META, "metadata")
  if not storage.exists(path):
    return {}
  return json.loads(storage.read_text(path))


def read_subtree(step_dir: str, keys: Sequence[str] = ("params",)) -> Any:
  """One subtree of the saved state (by default the parameters, without the optimizer
  state) as host NumPy arrays, whatever mesh it was saved from."""
  tree = state_metadata(step_dir)
  sub = tree
  for i, key in enumerate(keys):
    if not isinstance(sub, dict) or key not in sub:
      raise KeyError(f"{step_dir}: the saved state has no {'/'.join(keys[:i + 1])} "
                     f"(it has {sorted(sub) if isinstance(sub, dict) else type(sub).__name__})")
    sub = sub[key]
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), sub)
  for key in reversed(keys):
    item = {key: item}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = ocp.PyTreeCheckpointer().restore(
      epath.Path(storage.absolute(storage.join(step_dir, STATE))),
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  for key in keys:
    restored = restored[key]
  return restored

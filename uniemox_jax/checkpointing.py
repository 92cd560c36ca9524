"""Checkpoints: orbax `CheckpointManager` holding the train state and the grain iterator state.

A checkpoint step directory appears under its final name only once completely written
(orbax writes to a temporary directory and renames it), so a process killed mid-save leaves
nothing that a restart could mistake for a checkpoint; the next start removes such leftovers,
saying so. A save that fails (no space, a read-only disk, a refused request) raises
`SaveFailed`, naming the directory, the cause and the last good checkpoint, which stays: an
asynchronous save's failure is raised by the next `check()` after it happened (the training
loop checks every step). Restore goes into an abstract tree that carries the current mesh's
shardings: a checkpoint saved on 8 devices restores on 4 or 1.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import re
from typing import Any, Dict, List, Optional, Sequence

from absl import logging

from etils import epath
import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines import storage
from uniemox_jax import errors
from uniemox_jax.models import surgery

STATE, DATA, META = "state", "data", "meta"
# What orbax names a step's directory while it is being written.
TMP_MARK = ".orbax-checkpoint-tmp"


class SaveFailed(errors.UserError):
  """A checkpoint could not be written. The run's environment, not a bug: exit 2."""


def failure_cause(e: BaseException):
  """(cause in words, errno or None) of a failed write: OSErrors as they are, and the errors
  orbax and TensorStore raise for them (a ValueError whose text carries os_error_code, or a
  status such as PERMISSION_DENIED for a bucket)."""
  code = e.errno if isinstance(e, OSError) and e.errno else None
  text = str(e)
  found = re.search(r"os_error_code='?(\d+)", text)
  if code is None and found:
    code = int(found.group(1))
  if code is not None:
    import os  # pylint: disable=g-import-not-at-top
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})", code
  status = re.match(r"([A-Z_]{6,}):", text)
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  return (status.group(1) if status else first[:300]), None


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
    if not read_only:
      self._remove_leftovers()
    self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                          item_handlers=handlers)
    self._pending: Optional[int] = None      # the step an asynchronous save is writing

  def _remove_leftovers(self) -> None:
    """Removes the temporary directories of saves that failed or were killed (process 0),
    saying so: they hold no usable checkpoint and may fill the disk."""
    if jax.process_index() != 0 or not storage.isdir(self.directory):
      return
    for name in storage.listdir(self.directory):
      if TMP_MARK in name:
        storage.rmtree(storage.join(self.directory, name))
        logging.warning("Removed %s: an unfinished checkpoint save (it failed or was killed)",
                        storage.join(self.directory, name))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None,
           meta: Optional[Dict[str, Any]] = None) -> None:
    """`meta`: a JSON-able dict kept with the step (the task, the class names). Raises
    `SaveFailed` for this save (or the previous asynchronous one, which it waits for: a slow
    save's failure is reported as its own step's)."""
    if self._pending is not None:
      self.wait()
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items[META] = ocp.args.JsonSave(meta)
    self._pending = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e
    if not self._manager.is_saving_in_progress():
      self.wait()       # a synchronous save, or one already done: its errors now

  def check(self) -> None:
    """Raises `SaveFailed` if the asynchronous save in flight has failed; never waits."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def _failed(self, e: BaseException) -> SaveFailed:
    """`e` in one line; the failed save's temporary directory removed (it may fill a disk)."""
    step, self._pending = self._pending, None
    cause, code = failure_cause(e)
    if jax.process_index() == 0:
      for name in storage.listdir(self.directory) if storage.isdir(self.directory) else ():
        if name.startswith(f"{step}{TMP_MARK}"):
          try:
            storage.rmtree(storage.join(self.directory, name))
          except OSError:
            pass
    last = self._manager.latest_step()
    kept = f"the last good checkpoint, step {last}, is kept" if last is not None else \
        "no earlier checkpoint exists"
    return SaveFailed(f"could not save checkpoint {step} in {self.directory}: {cause}; {kept}; "
                      f"{errors.remedy(code)}, then rerun the same command to resume")

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The state at `step`, placed as `abstract_state`'s shardings say; the iterator (if
    given, and if the checkpoint has one) is moved to where it was at that step. A state saved
    with the other block layout (unrolled against scanned: `config.model.scan`) is read in
    its own layout and converted on the devices."""
    saved = self._manager.item_metadata(step)
    live = surgery.layout(abstract_state)
    stored = surgery.layout(dict(saved[STATE])) if saved is not None and saved.get(STATE) \
        else live
    target, relayout = abstract_state, None
    if stored and live and stored != live:
      logging.info("Checkpoint %d holds %s blocks: converting them to this run's %s layout",
                   step, stored, live)
      if live == "scanned":
        target = surgery.unstack_blocks(abstract_state, index=_layer_of)
        relayout = lambda t: surgery.stack_blocks(t, stack=jnp.stack)  # noqa: E731
      else:
        target, relayout = surgery.stack_blocks(abstract_state, stack=_stacked), \
            surgery.unstack_blocks
    items = {STATE: ocp.args.StandardRestore(target)}
    if data_iterator is not None and saved is not None and DATA in saved:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
    if relayout is None:
      return state
    return jax.jit(relayout, out_shardings=jax.tree.map(lambda x: x.sharding,
                                                        abstract_state))(state)

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises `SaveFailed` if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._pending is None:
        raise
      raise self._failed(e) from e
    self._pending = None

  def close(self) -> None:
    self._manager.close()


def _layer_of(x: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
  """One layer of a stacked abstract array (its sharding without the layers axis)."""
  del i
  spec = PartitionSpec(*tuple(x.sharding.spec)[1:])
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=NamedSharding(x.sharding.mesh, spec))


def _stacked(xs: Sequence[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
  """Abstract arrays stacked on a new, unsharded leading (layers) axis."""
  x = xs[0]
  spec = PartitionSpec(None, *tuple(x.sharding.spec))
  return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype,
                              sharding=NamedSharding(x.sharding.mesh, spec))


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
  step_dir = resolve_step_dir(path, flag)
  return (Checkpointer(storage.dirname(step_dir), read_only=True, asynchronous=False),
          int(storage.basename(step_dir)))


def finished_steps(directory: str) -> List[int]:
  """The finished steps under `directory`, read from its listing (no checkpoint manager, so
  no collective: any process may ask at any time). A step is finished once orbax has renamed
  its temporary directory into place (locally) or written its commit_success.txt (in a
  bucket, where there are no renames)."""
  if not storage.isdir(directory):
    return []
  steps = [int(n) for n in storage.listdir(directory) if n.isdigit()]
  if storage.is_remote(directory):
    steps = [s for s in steps
             if storage.exists(storage.join(directory, str(s), "commit_success.txt"))]
  return sorted(steps)


def latest_finished_step(directory: str) -> Optional[int]:
  steps = finished_steps(directory)
  return steps[-1] if steps else None


def resolve_step_dir(path: str, flag: str = "--checkpoint") -> str:
  """A step directory from "<dir>/<step>" or "<dir>" (its latest finished step). `flag`
  names where the path came from, for the error messages."""
  directory, step = split_checkpoint_path(path)
  if not storage.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist ({flag})")
  steps = finished_steps(directory)
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no finished checkpoint in {directory} ({flag})")
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} is not in {directory}; it has {steps} "
                            f"({flag})")
  return storage.join(directory, str(step))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One finished checkpoint step, opened once: where it is, its `meta` record and the saved
  state's tree (shapes and dtypes, no arrays). `open` takes "<dir>/<step>" or "<dir>" (its
  latest step); `read` loads a subtree as host arrays."""
  step_dir: str
  step: int
  meta: Dict[str, Any]
  tree: Any

  @classmethod
  def open(cls, path: str, flag: str = "--checkpoint") -> "Checkpoint":
    step_dir = resolve_step_dir(path, flag)
    state = epath.Path(storage.absolute(step_dir)) / STATE
    if not state.exists():
      raise FileNotFoundError(f"{step_dir} holds no train state (no '{STATE}' item)")
    meta_path = storage.join(step_dir, META, "metadata")
    meta = json.loads(storage.read_text(meta_path)) if storage.exists(meta_path) else {}
    return cls(step_dir, int(storage.basename(step_dir)), meta,
               ocp.PyTreeCheckpointHandler().metadata(state).tree)

  @property
  def label(self) -> str:
    """How figures and reports name it: "<step dir> (step N)"."""
    return f"{self.step_dir} (step {self.step})"

  @property
  def directory(self) -> str:
    """The checkpoints folder (WORKDIR/checkpoints, WORKDIR/best, an import's --out)."""
    return storage.dirname(self.step_dir)

  @property
  def workdir(self) -> str:
    return storage.dirname(self.directory)

  @property
  def params(self) -> Dict[str, Any]:
    """The saved parameters' tree (metadata: shapes and dtypes)."""
    return self.tree.get("params", {})

  def read(self, keys: Sequence[str] = ("params",)) -> Any:
    """One subtree of the saved state (by default the parameters, without the optimizer
    state) as host NumPy arrays, whatever mesh it was saved from."""
    sub = self.tree
    for i, key in enumerate(keys):
      if not isinstance(sub, dict) or key not in sub:
        raise KeyError(f"{self.step_dir}: the saved state has no {'/'.join(keys[:i + 1])} (it "
                       f"has {sorted(sub) if isinstance(sub, dict) else type(sub).__name__})")
      sub = sub[key]
    item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), sub)
    for key in reversed(keys):
      item = {key: item}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ocp.PyTreeCheckpointer().restore(
        epath.Path(storage.absolute(storage.join(self.step_dir, STATE))),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                    partial_restore=True))
    for key in keys:
      restored = restored[key]
    return restored

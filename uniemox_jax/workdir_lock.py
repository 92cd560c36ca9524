"""One owner per workdir: a second run started on the same WORKDIR is refused before it writes
anything, naming the run that holds it.

The owner is recorded in WORKDIR/workdir.lock (JSON: host, pid, start time, command), created
only where none exists: locally with O_EXCL, in a bucket with GCS's ifGenerationMatch=0
precondition, so of two processes or hosts racing for one workdir exactly one wins. The lock is
removed when the run ends, however it ends short of being killed. A lock left behind by a
killed process on this host (its pid is gone, or now belongs to another program) is taken
over, with a line saying so; one left by a process on another host cannot be checked from here,
so it is taken over only with --force_unlock. In a multi-process run process 0 holds the lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

from absl import logging

from data_pipelines import storage
from uniemox_jax import errors

LOCK_FILE = "workdir.lock"
FORCE_FLAG = "--force_unlock"


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _start_ticks(pid: int) -> str:
  """The process's start time (clock ticks after boot): a pid reused by another program after
  ours died has another. "" where /proc is not available."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: str
  command: str
  boot_id: str = ""
  start_ticks: str = ""

  @classmethod
  def this_process(cls) -> "Holder":
    return cls(host=socket.gethostname(), pid=os.getpid(),
               started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               command=" ".join([os.path.basename(sys.orig_argv[0])] + sys.orig_argv[1:]),
               boot_id=_boot_id(), start_ticks=_start_ticks(os.getpid()))

  def describe(self) -> str:
    return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"

  def on_this_host(self) -> bool:
    return self.host == socket.gethostname() and self.boot_id == _boot_id()

  def alive(self) -> bool:
    """Whether the holder still runs (only meaningful on_this_host)."""
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True           # a process of another user has that pid
    return not self.start_ticks or _start_ticks(self.pid) == self.start_ticks


class WorkdirLock:
  """`acquire()` makes this process the workdir's owner or raises `errors.UserError`;
  `release()` gives it up."""

  def __init__(self, workdir: str, force: bool = False):
    self.path = storage.join(storage.absolute(workdir), LOCK_FILE)
    self.force = force
    self.me = Holder.this_process()
    self._held = False
    self._generation: Optional[str] = None

  def acquire(self) -> None:
    data = json.dumps(dataclasses.asdict(self.me), indent=2).encode()
    with self._serialized():
      for _ in range(3):       # a holder may release between our attempt and our read
        if storage.create_exclusive(self.path, data):
          self._held, self._generation = True, storage.generation(self.path)
          return
        try:
          holder, generation = self._read()
        except FileNotFoundError:
          continue
        self._take_over(holder, generation)
    raise errors.UserError(f"{self.path}: could not take the workdir's lock (another run keeps "
                           "taking it); retry")

  @contextlib.contextmanager
  def _serialized(self) -> Iterator[None]:
    """Locally, acquisitions (and so take-overs of a stale lock) run one at a time under an
    flock of the workdir: two runs that both find a stale lock cannot both remove it and win.
    In a bucket the generation preconditions do that."""
    if storage.is_remote(self.path):
      yield
      return
    import fcntl  # pylint: disable=g-import-not-at-top
    fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)      # releases the flock

  def _read(self):
    generation = storage.generation(self.path)
    text = storage.read_text(self.path)
    try:
      holder = Holder(**json.loads(text))
    except (ValueError, TypeError):
      holder = None           # half written (a crash between create and write), or foreign
    return holder, generation

  def _take_over(self, holder: Optional[Holder], generation: Optional[str]) -> None:
    """Removes a stale lock (saying why), or refuses naming its live or unknown holder."""
    who = holder.describe() if holder else "an unreadable lock file"
    if holder is not None and holder.on_this_host():
      if holder.alive():
        raise errors.UserError(
            f"the workdir is in use by another run ({who}); wait for it, stop it, or choose "
            f"another --workdir (lock: {self.path})")
      reason = f"left by a process that no longer runs ({who})"
    elif self.force:
      reason = f"{FORCE_FLAG} ({who})"
    else:
      raise errors.UserError(
          f"the workdir is locked by {who}, which cannot be checked from this host; if that "
          f"run has ended, rerun with {FORCE_FLAG} to take the lock over (lock: {self.path})")
    if storage.remove_generation(self.path, generation):
      logging.warning("Took over the workdir lock %s: %s", self.path, reason)

  def release(self) -> None:
    if self._held:
      self._held = False
      with contextlib.suppress(OSError):
        storage.remove_generation(self.path, self._generation)


@contextlib.contextmanager
def held(workdir: str, force: bool = False, holder: bool = True) -> Iterator[None]:
  """The workdir's lock, held by this process for the block when `holder` (process 0 of a
  multi-process run); the other processes hold nothing."""
  if not holder:
    yield
    return
  lock = WorkdirLock(workdir, force)
  with errors.as_user_errors():
    lock.acquire()
  try:
    yield
  finally:
    lock.release()

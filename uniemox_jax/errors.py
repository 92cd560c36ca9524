"""The exceptions that mean the user's input is wrong, as opposed to a bug.

The command-line tools (`uniemox_jax.cli`) print a user error as one line naming the file,
field or flag, and exit with `EXIT_USER_ERROR`, without a traceback (UNIEMOX_TRACEBACK=1 shows
it); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Callable, NoReturn, Optional

EXIT_USER_ERROR = 2
# A preempted run saved its state and stopped early: rerun the same command to resume.
# (EX_TEMPFAIL of sysexits.h; launch/slurm_gpu.sbatch requeues on it, launch/tpu_pod.sh
# restarts.)
EXIT_PREEMPTED = 75
# Stopped by Ctrl-C (128 + SIGINT, as shells report it), after saving.
EXIT_INTERRUPTED = 130


# What to do about a write the machine refused, by errno.
_REMEDIES = {
    errno.ENOSPC: "free space on that disk, or write elsewhere",
    errno.EDQUOT: "free space within your quota, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "this user may not write there: fix the permissions or write elsewhere",
    errno.EPERM: "this user may not write there: fix the permissions or write elsewhere",
}
ENVIRONMENT_ERRNOS = tuple(_REMEDIES)


def remedy(code: Optional[int]) -> str:
  return _REMEDIES.get(code, "check that the location is writable")


class UserError(ValueError):
  """A mistake in what the user gave: a config field, a flag, a path, a dataset folder, a
  checkpoint that does not fit. A ValueError, so callers that catch those still do."""


class Preempted(Exception):
  """The run was preempted (SIGTERM) after saving `step`; nothing after training ran."""
  exit_code = EXIT_PREEMPTED
  what = "preempted"

  def __init__(self, step: int):
    super().__init__(f"{self.what} at step {step}; rerun the same command to resume")
    self.step = step


class Interrupted(Preempted):
  """Stopped by Ctrl-C after saving `step`; nothing after training ran."""
  exit_code = EXIT_INTERRUPTED
  what = "interrupted"


@contextlib.contextmanager
def as_user_errors():
  """Inside, a ValueError, KeyError or OSError is taken for a problem with the user's inputs
  (the block validates them: config fields, paths, datasets, checkpoints) and re-raised as a
  `UserError` with the same message. Other exceptions (bugs) pass unchanged."""
  try:
    yield
  except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
          PermissionError):
    raise      # already user errors, kept as they are
  except (ValueError, KeyError, OSError) as e:
    text = e.args[0] if isinstance(e, KeyError) and e.args else message(e)
    raise UserError(str(text)) from e


class Problems(UserError):
  """Several user errors found at once (the checks before a run's first step): the command
  line prints one `error:` line for each."""

  def __init__(self, problems):
    super().__init__("\n".join(problems))
    self.problems = list(problems)


class Checks:
  """Runs independent checks and reports every failure at once:

    checks = Checks()
    with checks.check():
      ...               # a UserError (or ValueError, KeyError, OSError) is kept
    checks.raise_any()  # that error for one problem, Problems (one line each) for several
  """

  def __init__(self):
    self.errors = []

  @property
  def problems(self):
    return [p for e in self.errors for p in (getattr(e, "problems", None) or [message(e)])]

  @contextlib.contextmanager
  def check(self):
    try:
      with as_user_errors():
        yield
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
      self.errors.append(e)

  def raise_any(self) -> None:
    if len(self.errors) == 1:
      raise self.errors[0]
    if self.errors:
      raise Problems(self.problems)


def message(e: BaseException) -> str:
  """An exception in words; an OSError as "<reason>: <path>", with what to do when the
  machine refused a write (no space, read-only, permissions)."""
  if isinstance(e, OSError) and e.filename and e.strerror:
    text = f"{e.strerror}: {e.filename}"
    if e.errno in ENVIRONMENT_ERRNOS:
      text += f" ({remedy(e.errno)})"
    return text
  return str(e)


def run_command(main: Callable[[], int]) -> NoReturn:
  """`sys.exit(main())` for the argparse commands (convert, suite, results): a ValueError or
  OSError, the user's input, is one line `error: ...` and EXIT_USER_ERROR (UNIEMOX_TRACEBACK=1
  raises it with its traceback instead)."""
  try:
    sys.exit(main())
  except (ValueError, OSError) as e:
    if os.environ.get("UNIEMOX_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)

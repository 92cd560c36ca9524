"""The exceptions that mean the user's input is wrong, as opposed to a bug.

The command-line tools (`uniemox_jax.cli`) print a user error as one line naming the file,
field or flag, and exit with `EXIT_USER_ERROR`, without a traceback (UNIEMOX_TRACEBACK=1 shows
it); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib

EXIT_USER_ERROR = 2
# A preempted run saved its state and stopped early: rerun the same command to resume.
# (EX_TEMPFAIL of sysexits.h; launch/slurm_gpu.sbatch requeues on it, launch/tpu_pod.sh
# restarts.)
EXIT_PREEMPTED = 75


class UserError(ValueError):
  """A mistake in what the user gave: a config field, a flag, a path, a dataset folder, a
  checkpoint that does not fit. A ValueError, so callers that catch those still do."""


class Preempted(Exception):
  """The run was preempted (SIGTERM) after saving `step`; nothing after training ran."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}; rerun the same command to resume")
    self.step = step


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
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise UserError(str(message)) from e

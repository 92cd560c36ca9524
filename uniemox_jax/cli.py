"""What every command-line tool of the project shares: quiet libraries, one-line user errors,
the preemption exit code, and processes that fail together.

  cli.run(main)      instead of absl's app.run(main)

- A user's mistake (a bad flag or config field, a missing path or split, a checkpoint that
  does not fit, corrupt data) or a problem of the environment (no space left, a read-only or
  forbidden location, an unreachable bucket) prints one line `error: ...` naming it (one line
  per problem, when the checks before the first step found several) and exits 2, without a
  traceback; UNIEMOX_TRACEBACK=1 shows the traceback too. A usage mistake says so and points
  to --help. Anything else is a bug: traceback, exit 1.
- A preempted run exits with `errors.EXIT_PREEMPTED` (75) after its last line "preempted at
  step N; rerun the same command to resume"; a first Ctrl-C saves and stops the same way with
  "interrupted at step N; ..." and `errors.EXIT_INTERRUPTED` (130); a second Ctrl-C stops at
  once, without saving (130).
- With several processes, a failing process tells the others (`distributed.report_failure`)
  and exits at once, so that no process waits on a collective that cannot complete.
"""
from __future__ import annotations

import os

# Before TensorFlow, transformers or JAX print anything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")        # TF's C++ INFO/WARNING, oneDNN notes
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# transformers otherwise imports PyTorch and TensorFlow model code (seconds per run) that the
# Flax CLIP teacher never uses; a teacher folder holding only pytorch_model.bin needs
# USE_TORCH=1 (model.safetensors loads either way).
os.environ.setdefault("USE_TORCH", "0")
os.environ.setdefault("USE_TF", "0")
# The input pipeline's worker processes hand batches over in shared memory; the batches still
# prefetched when a run ends are freed by multiprocessing's resource tracker, a process of its
# own that then warns about each ("leaked shared_memory objects") after the run's last line.
# It inherits this environment, not our warning filters.
os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [
    os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]))

import difflib  # noqa: E402
import json  # noqa: E402
import logging as pylogging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from uniemox_jax import errors  # noqa: E402

TRACEBACK_ENV = "UNIEMOX_TRACEBACK"

# Libraries whose INFO lines are noise in a training log (warnings and errors still show).
_QUIET_LIBRARIES = ("orbax", "grain", "absl/logging", "jax/_src", "etils", "tensorflow", "gcsfs")
# Warnings that say nothing a user can act on.
_QUIET_WARNINGS = (
    "TensorFlow and JAX classes are deprecated",          # transformers 4.57 on its Flax code
    "Couldn't find sharding info under RestoreArgs",      # orbax, restoring into our shardings
    "Sharding info not provided when restoring",
    "CheckpointManagerOptions.read_only=True",            # orbax, reading a checkpoint we
    "Given directory is read only",                       # opened read-only on purpose
)
# orbax's tracebacks of a failed save, logged from its threads: the run ends with one line
# that names the checkpoint, the cause and what to do (checkpointing.SaveFailed).
_SAID_BETTER = (
    "_SignalingThread.run() raised an exception",
    "Handler Commit operations or the Commit callback in background save thread",
    "[wait_until_finished] Save Finalize thread",
    "out of retries on exception",                        # gcsfs, before our one line
)


class _QuietLibraries(pylogging.Filter):

  def filter(self, record):
    text = record.getMessage()
    if any(w in text for w in _QUIET_WARNINGS):
      return False
    if not os.environ.get(TRACEBACK_ENV) and (
        any(w in text for w in _SAID_BETTER) or
        # orbax's writer tasks that failed with it, reported by asyncio when collected
        ("Task exception was never retrieved" in text and "/orbax/" in text)):
      return False
    if record.levelno >= pylogging.WARNING:
      return True
    return not any(f"/{lib}/" in record.pathname for lib in _QUIET_LIBRARIES)


def quiet() -> None:
  """Keeps library chatter out of the logs and the terminal."""
  for text in _QUIET_WARNINGS:
    warnings.filterwarnings("ignore", message=f".*{re.escape(text)}.*")
  warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
  for name in ("orbax", "absl", "jax", "grain", "transformers", "tensorflow", "gcsfs",
               "asyncio"):
    pylogging.getLogger(name).addFilter(_QuietLibraries())
  logging.get_absl_handler().addFilter(_QuietLibraries())


def _is_user_error(e: BaseException) -> bool:
  from data_pipelines import tfrecord  # pylint: disable=g-import-not-at-top
  return isinstance(e, (errors.UserError, tfrecord.CorruptRecordError, FileNotFoundError,
                        NotADirectoryError, IsADirectoryError, PermissionError,
                        ConnectionError, json.JSONDecodeError)) or (
                            isinstance(e, OSError) and e.errno in errors.ENVIRONMENT_ERRNOS)


def _exit_now(code: int) -> None:
  """Exits without waiting for the other processes (atexit handlers would)."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  os._exit(code)   # pylint: disable=protected-access


def _fail(message: str, code: int, several_processes: bool) -> None:
  if several_processes:
    from uniemox_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.report_failure(message.splitlines()[-1] if message else "failed")
    _exit_now(code)
  sys.exit(code)


def guarded(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
  """`main` with the exit policy of the module docstring."""
  def wrapped(argv):
    import jax  # pylint: disable=g-import-not-at-top
    try:
      return main(argv)
    except errors.Preempted as e:          # and errors.Interrupted
      print(str(e), file=sys.stderr, flush=True)
      _last_words()
      _exit_now(e.exit_code) if _several(jax) else sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print("\ninterrupted again: stopped at once, without saving; rerun the same command to "
            "resume from the last checkpoint", file=sys.stderr, flush=True)
      _stop_children()
      _exit_now(errors.EXIT_INTERRUPTED)
    except app.UsageError as e:
      print(f"error: {e}; see --help", file=sys.stderr, flush=True)
      sys.exit(errors.EXIT_USER_ERROR)
    except Exception as e:  # pylint: disable=broad-except
      several = _several(jax)
      if _is_user_error(e):
        if os.environ.get(TRACEBACK_ENV):
          traceback.print_exc()
        for problem in getattr(e, "problems", None) or [e]:
          print(f"error: {_one_line(problem)}", file=sys.stderr, flush=True)
        _last_words()
        _fail(str(e), errors.EXIT_USER_ERROR, several)
      traceback.print_exc()
      _fail(f"{type(e).__name__}: {e}", 1, several)
  return wrapped


def _last_words() -> None:
  """The line just printed is the run's last: what libraries log while the process ends
  (threads winding down, tasks collected) is not shown (UNIEMOX_TRACEBACK=1 shows it)."""
  if not os.environ.get(TRACEBACK_ENV):
    pylogging.disable(pylogging.CRITICAL)
    warnings.simplefilter("ignore")


def _stop_children() -> None:
  """Ends the input pipeline's worker processes (they ignore Ctrl-C: the run decides)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  for child in multiprocessing.active_children():
    child.terminate()


def _several(jax) -> bool:
  try:
    return jax.process_count() > 1
  except Exception:  # pylint: disable=broad-except
    return False


def _one_line(e) -> str:
  text = e if isinstance(e, str) else errors.message(e)
  return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _load_config(argv: Sequence[str]):
  """The config that --config names, without its overrides (None if it cannot be loaded)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  value = None
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--config="):
      value = arg.split("=", 1)[1]
  if not value:
    return None
  path, _, variant = value.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_uniemox_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant or None)
  except Exception:  # pylint: disable=broad-except
    return None


def _config_field_error(argv: Sequence[str], e: BaseException) -> str:
  """An unknown --config.<field>: the flag as given, and the closest known fields."""
  config = _load_config(argv)
  if config is None:
    return f"a --config override names no config field ({_one_line(e)})"

  def missing(path):
    node = config
    for part in path.split("."):
      if node is None or not hasattr(node, "keys") or part not in node.keys():
        return node, part
      node = node[part]
    return None, None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    flag = arg.split("=")[0]
    parent, part = missing(flag[len("--config."):])
    if part is not None:
      close = difflib.get_close_matches(part, list(parent.keys()), n=3, cutoff=0.5)
      return f"{flag}: no such config field" + (
          f"; closest: {', '.join(close)}" if close else "")
  return f"a --config override names no config field ({_one_line(e)})"


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing, with every parsing problem reported in one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    error, message = e, str(e)
  except (AttributeError, KeyError) as e:     # ml_collections: an unknown --config.<field>
    error, message = e, _config_field_error(argv, e)
  except (ValueError, TypeError, FileNotFoundError) as e:    # a config file's get_config
    error, message = e, _one_line(e)
  if os.environ.get(TRACEBACK_ENV):
    traceback.print_exception(error)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """absl's app.run with this module's policies."""
  quiet()
  app.run(guarded(main), flags_parser=parse_flags)

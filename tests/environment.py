"""What the test processes run with: fake CPU devices, one shared compilation cache, quick
compiles, the short training run's shape; and `read_until`, to follow a started run's log.

The suite is mostly compiles of tiny models. Two XLA flags make them cheaper: LLVM's
optimization level 0 (`--xla_backend_optimization_level=0`) and XLA:CPU's older loop emitters
instead of its MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`). Measured on a
30-step training process of the tests' short run with an empty cache (2-core dev machine):
84.7 s of CPU with neither, 56.2 s at -O0, 42.0 s with both. The programs run a little slower
and differ from the default build in the last bits, which no test compares across builds: the
pytest processes and every process they start compile alike.
"""
import os
import re
import socket
import time

CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"uniemox_test_jax_cache_{os.getuid()}")
QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


# The shape of the tests' short pretraining processes (test_trainer, test_cloud_storage,
# test_lifecycle): the demo model, 30 steps, mesh data x fsdp 4, on the synthetic set of 6, 2 and
# 2 images per class at 48 px (made by the run, or converted: conftest's `synthetic_data`).
# Runs of one shape compile the same programs, so only the first process of each device layout
# compiles them; the others load them from CACHE (measured: a 30-step process, 53 s of CPU cold,
# 27 s cached). A new test's run should keep this shape unless it tests another one.
SHORT_RUN_STEPS = 30
SHORT_RUN = ["--config", "configs/demo.py:evals=False", f"--config.total_steps={SHORT_RUN_STEPS}",
             "--config.mesh.fsdp=4"]
SYNTHETIC_DATA = ["--config.data.synthetic_per_class=6,2,2", "--config.data.synthetic_image_size=48"]


def xla_flags(devices: int = 8) -> str:
  return f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE}"


def subprocess_env(devices: int = 8, **extra: str) -> dict:
  """The environment of a training or evaluation process a test starts: CPU, `devices` fake
  devices, offline Hugging Face, every compiled program kept in the shared cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS=xla_flags(devices),
              JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              **extra)


def read_until(proc, pattern: str) -> str:
  """Reads a started run's log (its stderr pipe) line by line until a line matches `pattern`;
  returns what was read. Raises with the log's tail when the process ends first."""
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if re.search(pattern, line):
      return "".join(seen)
  proc.wait()
  raise AssertionError(f"exited {proc.returncode} before a line matched {pattern!r}:\n"
                       + "".join(seen)[-3000:])


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 300.0, poll: float = 0.1):
  """Polls `condition()` until it returns something true (returned), at most `timeout` seconds
  (generous: the suite runs on busy machines); raises naming `what` otherwise."""
  deadline = time.monotonic() + timeout
  while True:
    value = condition()
    if value:
      return value
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    time.sleep(poll)

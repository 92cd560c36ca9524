"""What the test processes run with: fake CPU devices, one shared compilation cache, and
quick compiles.

LLVM's optimization level 0 (`--xla_backend_optimization_level=0`) takes about a third less CPU
to compile a training step than the default, and the suite is mostly compiles of tiny models;
the programs then run a little slower and may differ from the default build in the last bits,
which no test compares across builds (the bitwise resume checks compare runs compiled alike).
"""
import os

CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"uniemox_test_jax_cache_{os.getuid()}")
QUICK_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8) -> str:
  return f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE}"


def subprocess_env(devices: int = 8, **extra: str) -> dict:
  """The environment of a training or evaluation process a test starts: CPU, `devices` fake
  devices, offline Hugging Face, every compiled program kept in the shared cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS=xla_flags(devices),
              JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              **extra)

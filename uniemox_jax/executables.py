"""A train step compiled once, written to a file, and loaded by the run instead of compiled
there (MaxText's `compiled_trainstep_file`). The pod check compiles it for the slice on a CPU
host (`python -m uniemox_jax.tools.aot ... --write_step FILE`). The pod run loads it with
`--config.compiled_step=FILE`, local or gs://, and starts without compiling.

The file holds the serialized executable with its argument and result trees, and what it was
compiled for:
- the program's fingerprint, the sha256 of the lowered StableHLO text. Any change of config,
  shape, sharding or code that changes the step changes it; a learning rate is a constant of
  the program, so it counts too;
- the platform, device kind and device count, and the compiler's options (config.mesh);
- the jax and jaxlib versions.
A run loads it only when all of these equal its own step's, and otherwise stops with one line
naming config.compiled_step and what differs. It is a pickle and loads native code: load only
files you wrote.
"""
from __future__ import annotations

import contextlib
import hashlib
import pickle
import re
from typing import Any, Dict, Sequence

import jax
from jax.experimental.compilation_cache import compilation_cache

from data_pipelines import storage
from uniemox_jax import errors

FORMAT = 1
FIELD = "config.compiled_step"


def fingerprint(lowered) -> str:
  """The sha256 of a lowered program's text (without source locations), its functions
  renamed in order of appearance: JAX numbers private functions by what the process lowered
  before (`@argsort_4` in one process is `@argsort_5` in another)."""
  names: Dict[str, str] = {}
  text = re.sub(r"@[\w.$-]+", lambda m: names.setdefault(m.group(0), f"@f{len(names)}"),
                lowered.as_text())
  return hashlib.sha256(text.encode()).hexdigest()


def environment(devices: Sequence[Any], options: Dict[str, Any]) -> Dict[str, Any]:
  """What an executable is bound to besides its program's text: the devices, the versions
  and the compiler's options (which the lowered text does not hold)."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "devices": len(devices), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "compiler_options": dict(options)}


@contextlib.contextmanager
def no_persistent_cache():
  """JAX's persistent compilation cache off (the cache decides once per process whether it is
  used: reset, it decides again). For programs of devices that are not here, and for one to be
  written out: on XLA:CPU an executable the cache loaded serializes without its kernels."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


def write(path: str, compiled, lowered, devices: Sequence[Any],
          options: Dict[str, Any]) -> None:
  """Writes `compiled` (the compiled `lowered`, compiled under `no_persistent_cache` with the
  compiler's `options`)."""
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  storage.write_bytes(path, pickle.dumps({
      "format": FORMAT, "fingerprint": fingerprint(lowered),
      "environment": environment(devices, options), "payload": payload, "in_tree": in_tree,
      "out_tree": out_tree}))


def read(path: str, field: str = FIELD) -> Dict[str, Any]:
  """The file's record; a missing, unreadable or foreign file is a user error naming it."""
  if not storage.exists(path):
    raise errors.UserError(f"{field}={path}: no such file")
  try:
    with storage.open(path, "rb") as f:
      record = pickle.load(f)
    if record["format"] != FORMAT:
      raise ValueError(f"format {record['format']}, this code reads {FORMAT}")
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"{field}={path} is not a compiled step written by "
                           f"`uniemox_jax.tools.aot --write_step` ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
  return record


def load(path: str, lowered, devices: Sequence[Any], options: Dict[str, Any],
         field: str = FIELD):
  """The executable of `path` for the step `lowered`, on `devices` (the run's mesh, in order),
  after checking it was compiled for exactly that step, environment and compiler's options."""
  record = read(path, field)
  here = environment(devices, options)
  differs = [f"{k} {record['environment'].get(k)!r}, this run {v!r}" for k, v in here.items()
             if record["environment"].get(k) != v]
  if record["fingerprint"] != fingerprint(lowered):
    differs.append("another program (config, shapes, shardings or code differ from the run "
                   "that wrote it)")
  if differs:
    raise errors.UserError(f"{field}={path} was compiled for {'; '.join(differs)}: write it "
                           "again with this config, or leave the field empty to compile here")
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  return serialize_executable.deserialize_and_load(
      record["payload"], record["in_tree"], record["out_tree"], backend=devices[0].client,
      execution_devices=list(devices))

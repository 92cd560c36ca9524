"""Every example of a split counted exactly once, on any number of devices and processes.

The eval pipeline (`input_pipeline.eval_dataset`) pads the last batch and marks padding with
`mask` False and `index` -1; `gather_split` runs a jitted function over the batches, gathers
every process's outputs, drops the padding and puts the rest back in record order, and raises
if any record is missing or repeated.

An evaluator's jitted function is an `EvalStep`: compiled once per signature of its arguments
and kept, so that a training run compiles it ahead of its first step (`compile_ahead`, from
the eval batch's shapes) and every later evaluation runs that executable.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from uniemox_jax import distributed
from uniemox_jax import sharding


def check_batch(batch_size: int, mesh, field: str = "config.eval_batch_size") -> int:
  """This process's share of a global eval batch, after checking it divides evenly."""
  procs = jax.process_count()
  if batch_size % mesh.devices.size or batch_size % procs:
    raise ValueError(f"{field}={batch_size} must divide evenly over {mesh.devices.size} "
                     f"devices and {procs} processes")
  return batch_size // procs


def gather_split(fn: Callable[[Dict[str, jax.Array]], Dict[str, jax.Array]], dataset,
                 mesh, keys: Sequence[str] = ("image",), progress: bool = True,
                 description: str = "eval") -> Dict[str, np.ndarray]:
  """Runs `fn` (a jitted function of the device batch -> dict of [B, ...] outputs) over an
  `input_pipeline.eval_dataset` and returns, on every process, its outputs plus "label"
  (and "labels" for multi-label data) for every record of the split exactly once, in record
  order. Raises if any record is missing or repeated."""
  batch_sharding = sharding.batch_sharding(mesh)
  parts = []
  batches = iter(dataset)
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, total=len(dataset), desc=description, unit="batch")
  for i, host in enumerate(batches):
    device = {k: jax.make_array_from_process_local_data(batch_sharding, host[k]) for k in keys}
    if i == 0:
      fn = _compiled_together(fn, device, description)
    out = fn(device)
    local = {k: host[k] for k in ("index", "mask", "label", "labels") if k in host}
    parts.append((multihost_utils.process_allgather(out, tiled=True),
                  multihost_utils.process_allgather(local, tiled=True)))
  if not parts:
    raise ValueError("the evaluation split yielded no batch")
  joined = {k: np.concatenate([np.asarray(p[0][k]) for p in parts]) for k in parts[0][0]}
  joined.update({k: np.concatenate([np.asarray(p[1][k]) for p in parts]) for k in parts[0][1]})
  keep = joined.pop("mask").astype(bool)
  index = joined.pop("index")[keep]
  order = np.argsort(index, kind="stable")
  index = index[order]
  if not np.array_equal(index, np.arange(len(index))):
    raise RuntimeError("evaluation did not see every record exactly once: "
                       f"{len(index)} records, indices {index[:10]}...")
  return {k: v[keep][order] for k, v in joined.items()}


def _compiled_together(fn, device_batch, name: str):
  """`fn` (a jitted function or an `EvalStep` of the batch, or a functools.partial of one)
  compiled for this batch, then every process waits for the others
  (`distributed.compile_together`); an EvalStep compiled ahead for it is not compiled again."""
  target, args = fn, ()
  if isinstance(fn, functools.partial) and not fn.keywords:
    target, args = fn.func, fn.args
  if isinstance(target, EvalStep):
    return functools.partial(target.executable(*args, device_batch, what=name), *args)
  if jax.process_count() == 1 or not hasattr(target, "lower"):
    return fn
  compiled = distributed.compile_together(target, *args, device_batch, name=name)
  return functools.partial(compiled, *args)


def _signature(tree: Any):
  """What a compiled program is specific to: the tree's structure and each leaf's shape,
  dtype and sharding (arrays and jax.ShapeDtypeStruct alike)."""
  leaves, structure = jax.tree.flatten(tree)
  return structure, tuple((tuple(x.shape), np.dtype(x.dtype), getattr(x, "sharding", None))
                          for x in leaves)


class EvalStep:
  """An evaluator's jitted function (of `(params, batch) -> {name: [B, ...]}` for
  `gather_split`), compiled once per signature of its arguments (`_signature`) and kept:
  ahead of a training run's first step (`compile_ahead`), else at the first call it meets.
  After each compile every process waits for the others (a peer still compiling would time
  out the first collective)."""

  def __init__(self, jitted, name: str):
    self.jitted, self.name = jitted, name
    self.compiled: Dict[Any, Any] = {}

  def __call__(self, *args):
    return self.executable(*args)(*args)

  def executable(self, *args, what: str = ""):
    key = _signature(args)
    if key not in self.compiled:
      started = time.perf_counter()
      self.compiled[key] = self.jitted.lower(*args).compile()
      logging.info("Compiled the eval step of %s%s in %.1f s", self.name,
                   f" ({what})" if what else "", time.perf_counter() - started)
      distributed.barrier(f"{self.name} compiled")
    return self.compiled[key]

  def compile_ahead(self, params, mesh, batch_size: int, image_size: int,
                    keys: Sequence[str] = ("image",)) -> None:
    """Compiles for `params` and the eval pipeline's batches (global `batch_size` uint8
    images of `image_size` under each of `keys`, split over the mesh) before any is read."""
    shape = (batch_size, image_size, image_size, 3)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding.batch_sharding(mesh))
             for k in keys}
    self.executable(params, batch, what="ahead of the first step")

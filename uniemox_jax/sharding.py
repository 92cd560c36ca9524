"""Logical axis names -> mesh axes, and the mesh itself.

Models name their parameter and activation axes ("embed", "mlp", "heads", "batch", ...);
`LOGICAL_RULES` maps those names onto the mesh axes ("data", "fsdp"). With an `fsdp` axis of
size 1 this is plain data parallelism; with a larger one, every parameter whose "embed"
axis divides is sharded across it (ZeRO-3 style) and gathered by XLA where it is used.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

LOGICAL_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("decoder_embed", None),
    ("layers", None),
)


def with_rules(fn, mesh: Mesh):
  """`fn` run with the logical axis rules and `mesh`'s abstract mesh in scope, so that
  `nn.with_logical_constraint` inside it becomes a sharding constraint when traced (outside
  such a scope Flax makes those annotations no-ops). Meant to be jitted."""
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(
        LOGICAL_RULES):
      return fn(*args, **kwargs)
  return wrapped


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); -1 fills the axis with what is left."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or (data != -1 and data < 1):
    raise ValueError(f"mesh sizes must be positive (or -1 for data), got data={data}, "
                     f"fsdp={fsdp}")
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"config.mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


# The TPU compiler's options that turn its windowed einsums off: with fsdp it splits the
# matmuls whose operands are all-gathered or whose results are reduce-scattered into loops
# over the collective's pieces. At fsdp 16 that doubled the L/16 step by its own estimate.
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compiler_options(mesh: Mesh, windowed_einsum: bool) -> dict:
  """The options a step on `mesh` is compiled with (config.mesh.windowed_einsum). They are
  the TPU compiler's: XLA:CPU refuses them by name, so other platforms get none."""
  if windowed_einsum or mesh.devices.flat[0].platform != "tpu":
    return {}
  return dict(NO_WINDOWED_EINSUM)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of logically boxed (abstract) params, e.g. from
  `jax.eval_shape(model.init, ...)`."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def host_to_global(tree: Any, shardings: Any) -> Any:
  """Host values (the same on every process) -> global arrays laid out as `shardings` (one
  sharding, or a tree of them). Works across processes, unlike `jax.device_put` of arrays
  that already live on one device."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)

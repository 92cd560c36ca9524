"""Optimizer and learning-rate schedule of docs/method.md §4 (and 5), from `config.optim`.

AdamW(b1, b2, weight decay on kernels only: no decay on biases, norms, position / CLS / mask
tokens), lr = base_lr * global_batch / 256, linear warmup then half-cosine to `min_lr`,
optional global-norm gradient clipping; for fine-tuning, layer-wise learning-rate decay
(`layerwise_multipliers`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Step counts resolved from epochs (or given directly) for one run."""
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int


def resolve_schedule(config, num_examples: int) -> Schedule:
  """Steps from `config.total_epochs` / `config.optim.warmup_epochs`, or from
  `config.total_steps` / `config.optim.warmup_steps` when those are set (> 0)."""
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_examples} "
                     "training examples")
  total = config.total_steps if config.total_steps > 0 else int(
      round(config.total_epochs * steps_per_epoch))
  warmup = config.optim.warmup_steps if config.optim.warmup_steps > 0 else int(
      round(config.optim.warmup_epochs * steps_per_epoch))
  if total < 1:
    raise ValueError("the run has no steps: set config.total_epochs or config.total_steps")
  return Schedule(total, min(warmup, total), steps_per_epoch)


def peak_lr(config) -> float:
  """base_lr x global batch / 256 (the linear scaling rule of MAE and the reference)."""
  return config.optim.base_lr * config.batch_size / 256


def learning_rate(config, schedule: Schedule) -> Callable[[Any], Any]:
  peak = peak_lr(config)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=schedule.warmup_steps,
      decay_steps=max(schedule.total_steps, schedule.warmup_steps + 1),
      end_value=config.optim.min_lr)


def decay_mask(params: Any) -> Any:
  """True for the matrices (Dense and Conv kernels); False for biases, norms and tokens."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def layer_ids(params: Any, depth: int) -> Any:
  """Each parameter's layer in MAE's layer-wise decay numbering: 0 for the patch embedding, the
  CLS token and a learned position table, i + 1 for encoder block i, depth + 1 for everything after the blocks (the
  final norms and the head). A scanned stack ("blocks", layers on axis 0) gets an integer array
  shaped to broadcast over its leaf, one id per layer."""
  def one(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    if "encoder" in names:
      rest = names[names.index("encoder") + 1:]
      if rest[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
      if rest[0] == "transformer" and rest[1].startswith("block_"):
        return int(rest[1][len("block_"):]) + 1
      if rest[0] == "transformer" and rest[1] == "blocks":
        if leaf.shape[0] != depth:
          raise ValueError(f"{'/'.join(names)}: scanned stack of {leaf.shape[0]} layers, "
                           f"expected {depth}")
        return np.arange(1, depth + 1).reshape((depth,) + (1,) * (leaf.ndim - 1))
    return depth + 1
  return jax.tree_util.tree_map_with_path(one, params)


def layerwise_multipliers(params: Any, depth: int, decay: float) -> Any:
  """Learning-rate multiplier of every parameter: decay ** (depth + 1 - layer id), so the head
  trains at the full rate, block i at decay ** (depth - i), the patch embedding at
  decay ** (depth + 1) (MAE's param_groups_lrd)."""
  return jax.tree.map(lambda i: np.float32(decay) ** (depth + 1 - np.asarray(i)),
                      layer_ids(params, depth))


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its constant multiplier. After AdamW (whose update is linear
  in the learning rate, weight decay included) this is a per-parameter learning rate."""
  def scale(updates, params=None):
    del params
    return jax.tree.map(lambda u, m: u * np.asarray(m, u.dtype), updates, multipliers)
  return optax.stateless(scale)


def make_optimizer(config, lr_schedule, multipliers: Optional[Any] = None,
                   ) -> optax.GradientTransformation:
  """`multipliers`: an optional tree (like the params) of per-parameter lr multipliers."""
  o = config.optim
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(lr_schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay_mask))
  if multipliers is not None:
    parts.append(scale_by_multipliers(multipliers))
  return optax.chain(*parts)

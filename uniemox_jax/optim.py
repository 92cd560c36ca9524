"""Optimizer and learning-rate schedule of METHOD.md 4 (and 5), from `config.optim`.

AdamW(b1, b2, weight decay on kernels only: no decay on biases, norms, position / CLS / mask
tokens), lr = base_lr * global_batch / 256, linear warmup then half-cosine to `min_lr`,
optional global-norm gradient clipping.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
  total = config.total_steps if config.get("total_steps", 0) > 0 else int(
      round(config.total_epochs * steps_per_epoch))
  warmup = config.optim.warmup_steps if config.optim.get("warmup_steps", 0) > 0 else int(
      round(config.optim.warmup_epochs * steps_per_epoch))
  if total < 1:
    raise ValueError("the run has no steps: set config.total_epochs or config.total_steps")
  return Schedule(total, min(warmup, total), steps_per_epoch)


def learning_rate(config, schedule: Schedule) -> Callable[[Any], Any]:
  peak = config.optim.base_lr * config.batch_size / 256
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=schedule.warmup_steps,
      decay_steps=max(schedule.total_steps, schedule.warmup_steps + 1),
      end_value=config.optim.get("min_lr", 0.0))


def decay_mask(params: Any) -> Any:
  """True for the matrices (Dense and Conv kernels); False for biases, norms and tokens."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(config, lr_schedule) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.get("grad_clip", 0.0) > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(lr_schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)

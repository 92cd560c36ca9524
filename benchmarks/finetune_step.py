r"""Throughput and model-FLOPs utilization of one fine-tuning step (docs/method.md §5: drop
path 0.2, layer-wise lr decay, on-device random erasing + mixup/cutmix + label smoothing),
beside a plain supervised step of the same classifier (no augmentation, no decay) measured in
the same run.

  python benchmarks/finetune_step.py --vit B/16,L/16 --batch 256 [--remat full] [--find_max_batch]
  python benchmarks/finetune_step.py --vit mu/16 --batch 2 --steps 1    # CPU smoke size

The step is the one `uniemox_jax.finetune` trains with (`classification_loss`, the optimizer
of `uniemox_jax.optim`), on synthetic device-resident uint8 batches. MFU is the analytic model
FLOPs (uniemox_jax/flops.py) per second against --peak_tflops; on CPU it is left out.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from uniemox_jax import flops as flops_lib  # noqa: E402
from benchmarks import timing  # noqa: E402
from configs import finetune as finetune_config  # noqa: E402
from uniemox_jax import finetune  # noqa: E402
from uniemox_jax import models  # noqa: E402
from uniemox_jax import optim  # noqa: E402
from uniemox_jax.models import vit  # noqa: E402

NUM_CLASSES = 8


def build_step(variant: str, dtype: str, remat: str, recipe: bool, attention: str = "auto",
               scan: bool = False, image_size: int = 224):
  """(init, tx, step) of the fine-tuning step; `recipe` False: the plain supervised baseline."""
  config = finetune_config.get_config(f"vit={variant}")
  config.model.update(dtype=dtype, remat=remat, drop_path=0.2 if recipe else 0.0,
                      attention=attention, scan=scan, image_size=image_size)
  if not recipe:
    config.augment.update(erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
                          label_smoothing=0.0)
  model = models.classification_model(config.model, NUM_CLASSES)
  depth = vit.decode_variant(variant).depth

  def init(key):
    return nn.unbox(model.init({"params": key, "dropout": key},
                               jnp.zeros((1, image_size, image_size, 3),
                                         jnp.float32))["params"])
  mult = None
  if recipe:
    mult = optim.layerwise_multipliers(jax.eval_shape(init, jax.random.key(0)), depth, 0.75)
  tx = optim.make_optimizer(config, optax.constant_schedule(1e-4), mult)

  def step(state, batch, key, tx):
    params, opt_state = state
    (loss, _), grads = jax.value_and_grad(
        lambda p: finetune.classification_loss(model, config.augment, NUM_CLASSES, False, p,
                                               None, batch, key), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return init, tx, step


def measure(args, variant, attention, recipe, batch_size, steps, windows
            ) -> timing.StepTiming:
  init, tx, step = build_step(variant, args.dtype, args.remat, recipe, attention, args.scan,
                              args.image_size)
  params = jax.jit(init)(jax.random.key(0))
  state = (params, jax.jit(tx.init)(params))
  k1, k2 = jax.random.split(jax.random.key(1))
  size = args.image_size
  batch = {"image": jax.random.randint(k1, (batch_size, size, size, 3), 0, 256, jnp.uint8),
           "label": jax.random.randint(k2, (batch_size,), 0, NUM_CLASSES)}
  return timing.time_step(lambda s, b, k: step(s, b, k, tx), state, (batch,), steps, windows)


def main():
  p = argparse.ArgumentParser()
  timing.add_common_flags(p)
  args = p.parse_args()
  device = jax.devices()[0]
  on_accelerator = device.platform != "cpu"
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
        f"{args.dtype}; remat {args.remat}; scan {args.scan}", flush=True)
  print(timing.HEADER, flush=True)
  for variant in args.vit.split(","):
    model_flops = flops_lib.classifier_per_image(variant, NUM_CLASSES, args.image_size)
    baseline = None
    for attention in args.attention.split(","):
      for name, recipe in (("plain", False), ("finetune", True)):
        t = measure(args, variant, attention, recipe, args.batch, args.steps, args.windows)
        baseline = baseline or args.batch / t.median
        print(timing.format_row(f"{name} {variant} {attention}", args.batch, t, model_flops,
                                args.peak_tflops, on_accelerator, baseline), flush=True)
      if args.find_max_batch:
        size = timing.largest_batch(
            lambda b: measure(args, variant, attention, True, b, 1, 1), args.batch * 2)
        if size is not None:
          t = measure(args, variant, attention, True, size, args.steps, args.windows)
          print(timing.format_row(f"finetune {variant} {attention} max", size, t, model_flops,
                                  args.peak_tflops, on_accelerator, baseline), flush=True)


if __name__ == "__main__":
  main()

r"""Throughput and model-FLOPs utilization of one UniEmoX pretraining step, beside a plain MAE
step (no teacher, no person view, no fusion) measured in the same run.

  python benchmarks/train_step.py --vit B/16,L/16 --batch 256         # on a GPU
  python benchmarks/train_step.py --vit mu/16 --batch 8 --steps 3     # CPU smoke size

Batches are synthetic and device-resident (no input pipeline); the teacher is a randomly
initialized CLIP ViT-B/16 (the architecture of openai/clip-vit-base-patch16, no download),
or a tiny one for sizes below B. FLOPs are XLA's cost analysis of the compiled step (teacher
forward included). MFU is reported against --peak_tflops (default: H100/H200 dense bf16,
989.4); on CPU it is left out. --find_max_batch doubles the per-device batch until memory
runs out and prints the largest that fits.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import timing  # noqa: E402
from configs import pretrain  # noqa: E402
from uniemox_jax import losses  # noqa: E402
from uniemox_jax import models  # noqa: E402
from uniemox_jax import objective  # noqa: E402
from uniemox_jax.models import decoder as decoder_lib  # noqa: E402
from uniemox_jax.models import masking  # noqa: E402
from uniemox_jax.models import vit  # noqa: E402
from uniemox_jax.teacher import clip  # noqa: E402


def make_teacher(small: bool, dtype):
  from transformers import CLIPConfig, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  if small:
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2),
                        vision_config=dict(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8),
                        projection_dim=512)
  else:   # openai/clip-vit-base-patch16's architecture
    config = CLIPConfig(vision_config=dict(patch_size=16), projection_dim=512)
  model = FlaxCLIPModel(config, dtype=dtype, _do_init=False)
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0), model.input_shape)
  return clip.ClipTeacher(model, params)


class Mae(nn.Module):
  """The plain MAE baseline: masked scene through encoder and decoder, L3 only."""
  variant: str
  mask_ratio: float = 0.75
  dtype: vit.Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, images):
    enc = vit.Encoder(self.variant, 224, dtype=self.dtype, name="encoder")
    m = masking.random_masking(self.make_rng("mask"), images.shape[0], enc.num_patches,
                               self.mask_ratio)
    tokens, _ = enc(images, m.ids_keep, train=True)
    dec = decoder_lib.MaskDecoder(enc.num_patches, enc.shape.patch, dtype=self.dtype,
                                  name="decoder")
    pred = dec(dec.project(tokens), m.ids_restore)
    target = losses.reconstruction_target(decoder_lib.patchify(images, enc.shape.patch), False)
    return losses.masked_reconstruction_loss(pred, target, m.mask)


def _adamw():
  return optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)


def build_steps(variant: str, dtype):
  cfg = pretrain.get_config(f"vit={variant}").model
  cfg.dtype = "bfloat16" if dtype == jnp.bfloat16 else "float32"
  model = models.pretrain_model(cfg)
  small = vit.decode_variant(variant).width < 768
  teacher = make_teacher(small, dtype)
  tx = _adamw()

  def uniemox_init(key, batch):
    t = objective.teacher_outputs(teacher, teacher.params, batch)
    params = nn.unbox(model.init({"params": key, "mask": key}, batch["scene"][:2],
                                 batch["person"][:2], t["text_emb"][:2], t["image_emb"][:2],
                                 t["logit_scale"])["params"])
    return params, tx.init(params)

  def uniemox_step(state, teacher_params, batch, key):
    params, opt_state = state

    def loss_fn(p):
      return objective.pretrain_losses(model, p, teacher, teacher_params, batch, key)[0]["total"]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  mae = Mae(variant, dtype=dtype)

  def mae_init(key, batch):
    params = nn.unbox(mae.init({"params": key, "mask": key}, batch["scene"][:2])["params"])
    return params, tx.init(params)

  def mae_step(state, teacher_params, batch, key):
    del teacher_params
    params, opt_state = state
    loss, grads = jax.value_and_grad(
        lambda p: mae.apply({"params": p}, batch["scene"], rngs={"mask": key}))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return teacher, {"uniemox": (uniemox_init, uniemox_step), "mae": (mae_init, mae_step)}


def fake_batch(batch: int, dtype):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  shape = (batch, 224, 224, 3)
  return {"scene": jax.random.normal(k1, shape, dtype),
          "person": jax.random.normal(k2, shape, dtype),
          "text_emb": jax.random.normal(k3, (batch, 512), jnp.float32)}


def measure(init, step, teacher, batch_size, steps, dtype):
  batch = fake_batch(batch_size, dtype)
  state = jax.jit(init)(jax.random.key(0), batch)
  seconds, flops = timing.time_step(step, state, (teacher.params, batch), steps)
  return batch_size / seconds, flops / seconds


def main():
  p = argparse.ArgumentParser()
  timing.add_common_flags(p)
  args = p.parse_args()
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  device = jax.devices()[0]
  on_accelerator = device.platform != "cpu"
  if jax.device_count() > 1:
    print("note: measuring on one device (the first); run per chip", file=sys.stderr)
  print(f"device: {device.device_kind} ({device.platform}); per-device batch {args.batch}; "
        f"{args.dtype}; mask 0.75; teacher CLIP ViT-B/16 architecture")
  print(f"{'model':22s} {'images/s':>10s} {'TFLOP/s':>9s} {'MFU':>6s} {'vs MAE':>7s}"
        + ("  max batch" if args.find_max_batch else ""))
  for variant in args.vit.split(","):
    teacher, fns = build_steps(variant, dtype)
    rates = {}
    for name in ("mae", "uniemox"):
      init, step = fns[name]
      rate, flops = measure(init, step, teacher, args.batch, args.steps, dtype)
      rates[name] = rate
      mfu = f"{flops / 1e12 / args.peak_tflops:6.1%}" if on_accelerator else "     -"
      extra = ""
      if args.find_max_batch:
        extra = "  " + str(timing.largest_batch(
            lambda size: measure(init, step, teacher, size, 1, dtype), args.batch))
      print(f"{name + ' ' + variant:22s} {rate:10.1f} {flops / 1e12:9.2f} {mfu} "
            f"{rate / rates['mae']:7.2f}{extra}")


if __name__ == "__main__":
  main()

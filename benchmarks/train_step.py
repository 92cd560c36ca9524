r"""Throughput and MFU of one UniEmoX pretraining step, beside a naive MAE step (XLA attention,
no remat, no teacher, no person view, no fusion) measured in the same run as the baseline.

  python benchmarks/train_step.py --vit B/16,L/16 --batch 256 --attention xla,cudnn   # a GPU
  python benchmarks/train_step.py --vit mu/16 --batch 2 --steps 1                     # CPU smoke

Batches are synthetic and device-resident (no input pipeline). The teacher is a randomly
initialized CLIP ViT-B/16 image tower (the architecture of openai/clip-vit-base-patch16, no
download; a tiny one for sizes below B): our fused tower (`--teacher fused`, the default) or
transformers' FlaxCLIPModel (`--teacher transformers`, needs transformers 4.x). Text
embeddings come with the batch, as with data converted with --text_embeddings.

MFU is the analytic model FLOPs (uniemox_jax/flops.py: matmuls, forward x3 for trained layers,
x1 for the teacher, no recomputation) per second over --peak_tflops; XLA's own count of the
compiled step is printed beside it. Images/s is the median of --windows timed windows of
--steps steps (min-max beside it); compile time is lowering + compilation. --find_max_batch
doubles the per-device batch until memory runs out and times the largest that fits.
--decoder_depth sets both models' decoder depth (the recipe's decoder: 8 blocks of width 512;
MAE's ablation goes down to 1, and so do the quick CPU runs of the tests).
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
from configs import pretrain  # noqa: E402
from uniemox_jax import losses  # noqa: E402
from uniemox_jax import models  # noqa: E402
from uniemox_jax import objective  # noqa: E402
from uniemox_jax.models import decoder as decoder_lib  # noqa: E402
from uniemox_jax.models import masking  # noqa: E402
from uniemox_jax.models import vit  # noqa: E402
from uniemox_jax.teacher import clip  # noqa: E402
from uniemox_jax.teacher import clip_vision  # noqa: E402

def make_teacher(variant: str, impl: str, dtype, attention: str,
                 abstract: bool = False) -> clip.ClipTeacher:
  """`abstract`: the weights as shapes only (ShapeDtypeStructs), for lowering without running:
  a B/16 tower's 86M random weights take seconds to draw on a CPU."""
  small = vit.decode_variant(variant).width < 768
  if impl == "fused":
    config = flops_lib.teacher_config(variant)
    tower = clip_vision.ClipVisionTower(config)
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3))
    init = (lambda *a: jax.eval_shape(tower.init, *a)) if abstract else jax.jit(tower.init)
    params = init(jax.random.key(0), pixels)["params"]
    return clip.ClipTeacher.from_vision_tower(config, params, dtype=dtype, attention=attention)
  if abstract:
    raise ValueError("abstract weights: the fused teacher only")
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
  return clip.ClipTeacher(model, params, dtype=dtype)


class Mae(nn.Module):
  """The plain MAE baseline: masked scene through encoder and decoder, L3 only."""
  variant: str
  mask_ratio: float = 0.75
  dtype: vit.Dtype = jnp.bfloat16
  attention: str = "xla"
  remat: str = "none"
  image_size: int = 224
  decoder_depth: int = 8

  @nn.compact
  def __call__(self, images):
    student = vit.StudentConfig(dtype=self.dtype, attention=self.attention, remat=self.remat)
    enc = vit.Encoder(self.variant, self.image_size, student=student, name="encoder")
    m = masking.random_masking(self.make_rng("mask"), images.shape[0], enc.num_patches,
                               self.mask_ratio)
    tokens, _ = enc(images, m.ids_keep, train=True)
    dec = decoder_lib.MaskDecoder(enc.num_patches, enc.shape.patch, depth=self.decoder_depth,
                                  student=student, name="decoder")
    pred = dec(dec.project(tokens), m.ids_restore)
    target = losses.reconstruction_target(decoder_lib.patchify(images, enc.shape.patch), False)
    return losses.masked_reconstruction_loss(pred, target, m.mask)


def _adamw():
  return optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)


# The trainer's objective with configs/pretrain.py's loss fields (L1 + L2 + L3, global L1).
OBJECTIVE = objective.from_config(pretrain.get_config().model)


def uniemox_model(variant: str, dtype, attention: str, remat: str, scan: bool,
                  image_size: int = 224, decoder_depth: int = 8):
  """The pretraining model of configs/pretrain.py with these settings."""
  cfg = pretrain.get_config(f"vit={variant}").model
  cfg.update(dtype="bfloat16" if dtype == jnp.bfloat16 else "float32", attention=attention,
             remat=remat, scan=scan, image_size=image_size)
  cfg.decoder.depth = decoder_depth
  return models.pretrain_model(cfg)


def uniemox_fns(variant: str, dtype, attention: str, remat: str, scan: bool, teacher_impl: str,
                image_size: int = 224, abstract_teacher: bool = False, decoder_depth: int = 8):
  """(init, step, teacher) of the UniEmoX step the trainer runs (same objective)."""
  model = uniemox_model(variant, dtype, attention, remat, scan, image_size, decoder_depth)
  teacher = make_teacher(variant, teacher_impl, dtype, attention, abstract_teacher)
  tx = _adamw()

  def init(key, batch):
    # Only shapes matter here (the teacher's weights must not become jit constants).
    params = nn.unbox(model.init({"params": key, "mask": key}, batch["scene"][:2],
                                 batch["person"][:2], decode=OBJECTIVE.reconstructs)["params"])
    return params, tx.init(params)

  def step(state, teacher_params, batch, key):
    params, opt_state = state

    def loss_fn(p):
      return OBJECTIVE(model, p, teacher, teacher_params, batch, key)[0][objective.TOTAL]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return init, step, teacher


def mae_fns(variant: str, dtype, attention: str, remat: str, image_size: int = 224,
            decoder_depth: int = 8):
  mae = Mae(variant, dtype=dtype, attention=attention, remat=remat, image_size=image_size,
            decoder_depth=decoder_depth)
  tx = _adamw()

  def init(key, batch):
    params = nn.unbox(mae.init({"params": key, "mask": key}, batch["scene"][:2])["params"])
    return params, tx.init(params)

  def step(state, teacher_params, batch, key):
    del teacher_params
    params, opt_state = state
    loss, grads = jax.value_and_grad(
        lambda p: mae.apply({"params": p}, batch["scene"], rngs={"mask": key}))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return init, step, None


def fake_batch(batch: int, dtype, image_size: int = 224):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  shape = (batch, image_size, image_size, 3)
  return {"scene": jax.random.normal(k1, shape, dtype),
          "person": jax.random.normal(k2, shape, dtype),
          "text_emb": jax.random.normal(k3, (batch, 512), jnp.float32)}


def measure(fns, batch_size: int, steps: int, windows: int, dtype, image_size: int = 224
            ) -> timing.StepTiming:
  init, step, teacher = fns
  batch = fake_batch(batch_size, dtype, image_size)
  state = jax.jit(init)(jax.random.key(0), batch)
  teacher_params = teacher.params if teacher is not None else {}
  return timing.time_step(step, state, (teacher_params, batch), steps, windows)


def main():
  p = argparse.ArgumentParser()
  timing.add_common_flags(p)
  p.add_argument("--teacher", default="fused", help="comma-separated: fused, transformers")
  p.add_argument("--no_baseline", action="store_true",
                 help="skip the naive MAE rows (ratios are then to the first row)")
  p.add_argument("--models", default="mae,uniemox", help="which steps: mae, uniemox")
  p.add_argument("--decoder_depth", type=int, default=8,
                 help="decoder blocks of both models (the recipe: 8; 1 for quick CPU runs)")
  args = p.parse_args()
  depth = args.decoder_depth
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  size = args.image_size
  device = jax.devices()[0]
  on_accelerator = device.platform != "cpu"
  if jax.device_count() > 1:
    print("note: measuring on one device (the first); run per chip", file=sys.stderr)
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
        f"{args.dtype}; mask 0.75; remat {args.remat}; scan {args.scan}; "
        f"decoder depth {depth}", flush=True)
  print(timing.HEADER, flush=True)
  for variant in args.vit.split(","):
    baseline = None
    if not args.no_baseline:
      t = measure(mae_fns(variant, dtype, "xla", "none", size, depth), args.batch, args.steps,
                  args.windows, dtype, size)
      baseline = args.batch / t.median
      print(timing.format_row(f"mae-naive {variant} xla", args.batch, t,
                              flops_lib.per_image("mae", variant, image_size=size,
                                                  decoder_depth=depth),
                              args.peak_tflops,
                              on_accelerator, baseline), flush=True)
    models_ = args.models.split(",")
    for attention in args.attention.split(","):
      same_as_baseline = attention == "xla" and args.remat == "none" and baseline
      if "mae" in models_ and not same_as_baseline:
        t = measure(mae_fns(variant, dtype, attention, args.remat, size, depth), args.batch,
                    args.steps, args.windows, dtype, size)
        baseline = baseline or args.batch / t.median
        print(timing.format_row(f"mae {variant} {attention}", args.batch, t,
                                flops_lib.per_image("mae", variant, image_size=size,
                                                  decoder_depth=depth),
                                args.peak_tflops,
                                on_accelerator, baseline), flush=True)
      if "uniemox" not in models_:
        continue
      for teacher_impl in args.teacher.split(","):
        fns = uniemox_fns(variant, dtype, attention, args.remat, args.scan, teacher_impl, size,
                          decoder_depth=depth)
        model_flops = flops_lib.per_image("uniemox", variant, global_batch=args.batch,
                                          teacher_cls_only=teacher_impl == "fused",
                                          teacher=flops_lib.teacher_config(variant),
                                          image_size=size, decoder_depth=depth)
        name = f"uniemox {variant} {attention} t={teacher_impl}"
        t = measure(fns, args.batch, args.steps, args.windows, dtype, size)
        baseline = baseline or args.batch / t.median
        print(timing.format_row(name, args.batch, t, model_flops, args.peak_tflops,
                                on_accelerator, baseline), flush=True)
        if args.find_max_batch:
          largest = timing.largest_batch(
              lambda b: measure(fns, b, 1, 1, dtype, size), args.batch * 2)
          if largest is None:
            print(f"{name}: {args.batch} is the largest batch tried that fits", flush=True)
            continue
          model_flops = flops_lib.per_image("uniemox", variant, global_batch=largest,
                                            teacher_cls_only=teacher_impl == "fused",
                                            teacher=flops_lib.teacher_config(variant),
                                            image_size=size, decoder_depth=depth)
          t = measure(fns, largest, args.steps, args.windows, dtype, size)
          print(timing.format_row(name + " max", largest, t, model_flops, args.peak_tflops,
                                  on_accelerator, baseline), flush=True)


if __name__ == "__main__":
  main()

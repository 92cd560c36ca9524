r"""The attention kernels and the fused teacher on the device at hand: do they agree, and what
does each cost?

  python benchmarks/attention_check.py            # a GPU: cuDNN against XLA
  python benchmarks/attention_check.py --cpu_ok   # CPU: XLA padded against unpadded only

1. Agreement (bf16 inputs; errors relative to an fp32 XLA reference, ||a - ref|| / ||ref||):
   attention outputs and q/k/v gradients for the sequence shapes this project runs (50 and
   20 tokens after masking, 197 full, 1 CLS query over 197 keys), per kernel and padding; the
   UniEmoX-B/16 loss and gradient with cuDNN against XLA; the fused CLIP tower against
   transformers' FlaxCLIPModel in fp32 (when transformers 4.x is importable).
2. Cost: forward + backward of one attention call per kernel/padding (median of 20 timed
   calls), and the teacher's forward at batch 256 per implementation.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from uniemox_jax import objective  # noqa: E402
from uniemox_jax.models import attention as attention_lib  # noqa: E402

# (name, batch, queries, keys, heads, head_dim)
SHAPES = [("encoder L/16 mask .75", 512, 50, 50, 16, 64),
          ("encoder mask .90", 512, 20, 20, 16, 64),
          ("decoder / teacher 197", 256, 197, 197, 16, 32),
          ("teacher 197 (12 heads)", 256, 197, 197, 12, 64),
          ("teacher last block CLS", 256, 1, 197, 12, 64)]


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn, *args, reps: int = 20) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def attention_variants(cpu: bool):
  if cpu:
    return [("xla", 1), ("xla", 64)]
  return [("xla", 1), ("cudnn", 1), ("cudnn", 8), ("cudnn", 64), ("cudnn", 128)]


def check_kernels(cpu: bool, batch: int = 0) -> None:
  print("== attention: error vs fp32 XLA (out, dq, dk, dv) and fwd+bwd ms ==", flush=True)
  for index, (name, b, t, s, h, d) in enumerate(SHAPES):
    b = batch or b
    keys = jax.random.split(jax.random.key(index), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, s, h, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, h, d), jnp.bfloat16)
    ct = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)

    def loss(q, k, v, ct, impl, pad):
      out = attention_lib.dot_product_attention(q, k, v, implementation=impl, pad_to=pad)
      return jnp.sum(out.astype(jnp.float32) * ct), out

    def fwd_bwd(impl, pad):   # every array an argument: no large jit constants
      return jax.jit(jax.value_and_grad(lambda q, k, v, ct: loss(q, k, v, ct, impl, pad),
                                        argnums=(0, 1, 2), has_aux=True))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, ref_out), ref_grads = fwd_bwd("xla", 1)(*f32, ct)
    for impl, pad in attention_variants(cpu):
      try:
        fn = fwd_bwd(impl, pad)
        (_, out), grads = fn(q, k, v, ct)
        errs = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        ms = timed(fn, q, k, v, ct) * 1e3
        print(f"  {name:24s} {impl:5s} pad {pad:3d}: " + " ".join(f"{e:.1e}" for e in errs)
              + f"  {ms:7.3f} ms", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {name:24s} {impl:5s} pad {pad:3d}: REFUSED {type(e).__name__}: "
              f"{str(e).splitlines()[0][:150]}", flush=True)


def check_model(cpu: bool, batch: int = 16) -> None:
  """UniEmoX-B/16's loss and gradient with each kernel, same params and keys."""
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  print("== UniEmoX-B/16 step: loss and gradient, cuDNN vs XLA (bf16) ==", flush=True)
  batch = train_step.fake_batch(batch, jnp.bfloat16)
  results = {}
  teacher = train_step.make_teacher("B/16", "fused", jnp.bfloat16, "xla")
  for impl in (["xla"] if cpu else ["xla", "cudnn"]):
    net = train_step.uniemox_model("B/16", jnp.bfloat16, impl, "none", False)
    init = train_step.uniemox_fns("B/16", jnp.bfloat16, impl, "none", False, "fused")[0]
    params = jax.jit(init)(jax.random.key(0), batch)[0]

    def loss_fn(p, teacher_params, batch, net=net):
      return train_step.OBJECTIVE(net, p, teacher, teacher_params, batch,
                                  jax.random.key(5))[0][objective.TOTAL]
    results[impl] = jax.jit(jax.value_and_grad(loss_fn))(params, teacher.params, batch)
  if "cudnn" in results:
    (lx, gx), (lc, gc) = results["xla"], results["cudnn"]
    flat_x = np.concatenate([np.ravel(x) for x in jax.tree.leaves(gx)])
    flat_c = np.concatenate([np.ravel(x) for x in jax.tree.leaves(gc)])
    print(f"  loss xla {float(lx):.6f} cudnn {float(lc):.6f}; gradient rel. difference "
          f"{rel(flat_c, flat_x):.2e}", flush=True)
  else:
    print(f"  loss xla {float(results['xla'][0]):.6f} (no cuDNN here)", flush=True)


def check_teacher(cpu: bool, batch: int = 256) -> None:
  from uniemox_jax.teacher import clip  # pylint: disable=g-import-not-at-top
  from uniemox_jax.teacher import clip_vision  # pylint: disable=g-import-not-at-top
  print(f"== CLIP ViT-B/16 image tower: agreement and forward time at batch {batch} ==",
        flush=True)
  config = clip_vision.VisionConfig()
  images = jax.random.normal(jax.random.key(3), (batch, 224, 224, 3), jnp.float32)
  teachers = {}
  try:
    from transformers import CLIPConfig, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
    hf = CLIPConfig(vision_config=dict(patch_size=16), projection_dim=512)
    for dtype in (jnp.float32, jnp.bfloat16):
      model = FlaxCLIPModel(hf, dtype=dtype, _do_init=False)
      params = jax.jit(model.init_weights, static_argnums=1)(jax.random.key(0),
                                                             model.input_shape)
      tag = "f32" if dtype == jnp.float32 else "bf16"
      teachers[f"transformers {tag}"] = clip.ClipTeacher(model, params, dtype=dtype)
      for impl in (["xla"] if cpu or dtype == jnp.float32 else ["xla", "cudnn"]):
        vision = clip_vision.from_transformers(params, config)
        teachers[f"fused {tag} {impl}"] = clip.ClipTeacher.from_vision_tower(
            config, jax.tree.map(jnp.asarray, vision), float(params["logit_scale"]),
            dtype=dtype, attention=impl)
  except ImportError as e:
    print(f"  transformers' FlaxCLIPModel unavailable ({e}); fused tower alone", flush=True)
    tower = clip_vision.ClipVisionTower(config)
    vision = jax.jit(tower.init)(jax.random.key(0), images[:1])["params"]
    for impl in (["xla"] if cpu else ["xla", "cudnn"]):
      teachers[f"fused bf16 {impl}"] = clip.ClipTeacher.from_vision_tower(
          config, vision, dtype=jnp.bfloat16, attention=impl)
  embeds = {}
  for name, t in teachers.items():
    fn = jax.jit(t.image_embed)
    embeds[name] = fn(t.params, images)
    ms = timed(fn, t.params, images, reps=10) * 1e3
    print(f"  {name:24s} forward {ms:8.2f} ms = {batch / ms * 1e3:8.0f} images/s", flush=True)
  if "transformers f32" in embeds:
    ref = embeds["transformers f32"]
    for name, e in embeds.items():
      print(f"  {name:24s} vs transformers f32: max abs {float(jnp.max(jnp.abs(e - ref))):.2e}",
            flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cpu_ok", action="store_true", help="run the XLA-only parts on a CPU")
  p.add_argument("--parts", default="kernels,model,teacher")
  p.add_argument("--small", action="store_true", help="batch 2 everywhere (a smoke run)")
  args = p.parse_args()
  device = jax.devices()[0]
  cpu = device.platform == "cpu"
  if cpu and not args.cpu_ok:
    sys.exit("no GPU here: pass --cpu_ok to run the XLA-only parts")
  print(f"device: {device.device_kind}; jax {jax.__version__}", flush=True)
  parts = args.parts.split(",")
  if "kernels" in parts:
    check_kernels(cpu, 2 if args.small else 0)
  if "model" in parts:
    check_model(cpu, 2 if args.small else 16)
  if "teacher" in parts:
    check_teacher(cpu, 2 if args.small else 256)


if __name__ == "__main__":
  main()

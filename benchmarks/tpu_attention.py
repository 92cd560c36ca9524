r"""Does the TPU flash attention kernel pay at the pretraining step's sequence lengths? By the
TPU compiler's count (issue: the path to 40% MFU). Each attention of the step (the teacher's
197 tokens, the encoder's visible tokens, the decoder's full sequence), forward and backward,
is compiled with libtpu for one chip of a slice on this CPU host, with the qkv projection
that feeds it. It is compiled as the models run it (XLA's attention, `models/attention.py`),
as XLA's attention with its scores held in bf16 between fusions, and with jax's Pallas
flash-attention kernel for TPU (`jax.experimental.pallas.ops.tpu.flash_attention`). The flash
version has its sequence padded to the kernel's block and the padding masked by segment ids.

  python benchmarks/tpu_attention.py --vit L/16 --topology v5e:2x2 --per_chip 64

Printed per attention: the compiler's estimated time (the ops' `estimated_cycles` at the clock
the chip's peak implies) and bytes. The compiler gives a Pallas kernel no cycle estimate, so
the flash rows count only what surrounds the kernel: the padding and the [B, T, H, d] <->
[B, H, T, d] transposes. Where that alone exceeds XLA's whole attention, the kernel cannot win
by this count, whatever it costs itself. These are cost-model estimates, not measurements.
"""
import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import mfu_breakdown  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402
from uniemox_jax import aot  # noqa: E402
from uniemox_jax.models import vit  # noqa: E402
from uniemox_jax.teacher import loading  # noqa: E402


def attentions(config):
  """{name: (tokens, heads, head_dim, whether the step differentiates it)} of the pretraining
  step's attentions (the teacher is frozen: forward only)."""
  student = vit.decode_variant(config.model.variant)
  tokens = vit.grid_size(config.model.image_size, student.patch) ** 2
  visible = int(tokens * (1 - config.model.mask_ratio))
  teacher = loading.KNOWN_TOWERS[config.teacher.name]
  dec = config.model.decoder
  return {"teacher": ((teacher.image_size // teacher.patch) ** 2 + 1, teacher.heads,
                      teacher.width // teacher.heads, False),
          "encoder (visible tokens)": (visible + 1, student.heads,
                                       student.width // student.heads, True),
          "decoder": (tokens + 1, dec.heads, dec.width // dec.heads, True)}


def xla_attention(q, k, v):
  from uniemox_jax.models import attention  # pylint: disable=g-import-not-at-top
  return attention.dot_product_attention(q, k, v, implementation="xla")


def bf16_scores_attention(q, k, v):
  """XLA's attention with the scores and probabilities kept in bfloat16 between the fusions
  (the softmax itself in float32), as PyTorch's CLIP and MAE hold them under bf16."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k)
  e = jnp.exp((scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))).astype(
      jnp.float32))
  return jnp.einsum("bhqk,bkhd->bqhd", (e / e.sum(-1, keepdims=True)).astype(q.dtype), v)


def flash_attention(q, k, v, block=128):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  batch, t, _, d = q.shape
  padded = -(-t // block) * block
  heads_first = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(  # noqa: E731
      0, 2, 1, 3)
  segments = jnp.broadcast_to((jnp.arange(padded) < t).astype(jnp.int32), (batch, padded))
  sizes = {f"block_{n}": block for n in ("q", "k_major", "k", "q_major_dkv", "k_major_dkv",
                                         "k_dkv", "q_dkv", "k_major_dq", "k_dq", "q_dq")}
  out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                           segment_ids=fa.SegmentIds(segments, segments),
                           sm_scale=1.0 / np.sqrt(d), block_sizes=fa.BlockSizes(block_b=1, **sizes))
  return out.transpose(0, 2, 1, 3)[:, :t]


def estimate(fn, batch, tokens, heads, head_dim, device, clock_ghz, backward=True):
  """(estimated ms, MiB moved, Pallas kernels, which carry no estimate) of the block's qkv
  projection and attention `fn`, forward and, with `backward`, backward. The projection is
  the same for both kernels; it is there so that the compiler may lay q, k and v out as the
  kernel wants them straight from the matmul."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss(x, kernel, g):
    qkv = jnp.einsum("btw,wnhd->btnhd", x, kernel)
    return (fn(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).astype(jnp.float32) * g).sum()
  where = jax.sharding.SingleDeviceSharding(device)
  width = heads * head_dim
  x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.bfloat16, sharding=where)
  kernel = jax.ShapeDtypeStruct((width, 3, heads, head_dim), jnp.bfloat16, sharding=where)
  g = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.float32, sharding=where)
  step = jax.grad(loss, argnums=(0, 1)) if backward else loss
  hlo = jax.jit(step).lower(x, kernel, g).compile().as_text()
  parts = mfu_breakdown.analyse(hlo).values()
  kernels = hlo.count('custom_call_target="tpu_custom_call"')   # Mosaic (Pallas) kernels
  return (sum(p[1] for p in parts) / clock_ghz / 1e6, sum(p[3] for p in parts) / 2 ** 20,
          kernels)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vit", default="L/16")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--per_chip", type=int, default=64)
  p.add_argument("--blocks", default="128,256", help="flash kernel block sizes to try")
  args = p.parse_args()
  config = pretrain_config.get_config(f"vit={args.vit}")
  device = aot.topology_devices(args.topology)[0]
  clock = aot.CLOCK_GHZ[args.topology.split(":")[0]]
  print(f"{args.topology}, one chip, {args.per_chip} images, bf16, forward and (but for the "
        f"teacher) backward; "
        f"compiler estimates at {clock} GHz, not measurements")
  print(f"{'attention':24s} {'tokens x heads x d':>18s} {'kernel':>10s} {'ms':>7s} "
        f"{'MiB':>8s}  Pallas kernels (no estimate)")
  for name, (t, h, d, backward) in attentions(config).items():
    rows = [("xla", xla_attention), ("xla bf16", bf16_scores_attention)] + [
        (f"flash {b}", functools.partial(flash_attention, block=int(b)))
        for b in args.blocks.split(",")]
    for kernel, fn in rows:
      ms, mib, uncounted = estimate(fn, args.per_chip, t, h, d, device, clock, backward)
      print(f"{name:24s} {f'{t} x {h} x {d}':>18s} {kernel:>10s} {ms:7.2f} {mib:8.0f}  "
            f"{uncounted}", flush=True)


if __name__ == "__main__":
  main()

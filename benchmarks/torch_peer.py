r"""The PyTorch peer of benchmarks/train_step.py: the same UniEmoX (and MAE) pretraining step
written the way the reference code runs it - timm ViT blocks (fused scaled-dot-product
attention), transformers' PyTorch CLIP image tower as the frozen teacher (SDPA attention),
bf16 autocast, fused AdamW, eager mode - timed the same way, on the same synthetic batches.

  python benchmarks/torch_peer.py --vit B/16,L/16 --batch 256        # a GPU
  python benchmarks/torch_peer.py --vit mu/16 --batch 2 --steps 1    # CPU smoke

It needs torch, timm and transformers (any line with PyTorch CLIP). Nothing of it is used by
the JAX code; it exists so the speed claim compares against a real peer, not a guess.
"""
import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from uniemox_jax import flops as flops_lib  # noqa: E402
from uniemox_jax.models.vit import decode_variant, sincos_2d  # noqa: E402


def _blocks(width, depth, heads, mlp_ratio):
  from timm.models.vision_transformer import Block  # pylint: disable=g-import-not-at-top
  return nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias=True,
                              norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                        for _ in range(depth)])


class MaskedViT(nn.Module):
  """MAE's encoder and decoder (timm blocks), and UniEmoX's easy fusion."""

  def __init__(self, variant, image_size=224, mask_ratio=0.75, dec_width=512, dec_depth=8):
    super().__init__()
    s = decode_variant(variant)
    self.patch, self.mask_ratio = s.patch, mask_ratio
    grid = image_size // s.patch
    self.proj = nn.Conv2d(3, s.width, s.patch, s.patch)
    self.register_buffer("pos", torch.from_numpy(sincos_2d(s.width, grid, True))[None])
    self.cls = nn.Parameter(torch.zeros(1, 1, s.width))
    self.blocks = _blocks(s.width, s.depth, s.heads, s.mlp_dim / s.width)
    self.norm = nn.LayerNorm(s.width, eps=1e-6)
    self.dec_embed = nn.Linear(s.width, dec_width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
    self.register_buffer("dec_pos", torch.from_numpy(sincos_2d(dec_width, grid, True))[None])
    self.dec_blocks = _blocks(dec_width, dec_depth, 16, 4.0)
    self.dec_norm = nn.LayerNorm(dec_width, eps=1e-6)
    self.pred = nn.Linear(dec_width, s.patch ** 2 * 3)
    self.fusion_norm = nn.LayerNorm(dec_width, eps=1e-6)
    self.fusion = nn.Linear(dec_width, dec_width)

  def encode(self, images):
    x = self.proj(images).flatten(2).transpose(1, 2) + self.pos[:, 1:]
    n, keep = x.shape[1], int(x.shape[1] * (1 - self.mask_ratio))
    noise = torch.rand(x.shape[0], n, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    mask = (ids_restore >= keep).float()
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.dec_embed(self.norm(x)), ids_restore, mask

  def decode(self, x, ids_restore):
    b, n = ids_restore.shape
    filler = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
    patches = torch.cat([x[:, 1:], filler], dim=1)
    patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], patches], dim=1) + self.dec_pos
    for blk in self.dec_blocks:
      x = blk(x)
    return self.pred(self.dec_norm(x))[:, 1:]

  def reconstruction_loss(self, images, pred, mask):
    b, c, h, w = images.shape
    p = self.patch
    target = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    target = target.reshape(b, (h // p) * (w // p), p * p * c)
    per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def make_teacher(small: bool, device):
  # pylint: disable-next=g-import-not-at-top
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  if small:
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=512)
  else:
    config = CLIPVisionConfig(patch_size=16, projection_dim=512)
  config._attn_implementation = "sdpa"   # pylint: disable=protected-access
  return CLIPVisionModelWithProjection(config).to(device).eval().requires_grad_(False), config


def step_fn(model, teacher, teacher_size, uniemox):
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                          fused=torch.cuda.is_available())

  def step(batch):
    scene, person, text = batch
    with torch.autocast(scene.device.type, dtype=torch.bfloat16):
      if not uniemox:
        tokens, restore, mask = model.encode(scene)
        loss = model.reconstruction_loss(scene, model.decode(tokens, restore), mask)
      else:
        b = scene.shape[0]
        tokens, restore, mask = model.encode(torch.cat([scene, person]))
        alpha, beta = tokens[:b, 0], tokens[b:, 0]
        gamma = F.elu(model.fusion(model.fusion_norm(alpha) + model.fusion_norm(beta)))
        with torch.no_grad():
          pixels = scene if scene.shape[-1] == teacher_size else F.interpolate(
              scene, size=(teacher_size, teacher_size), mode="bicubic")
          omega = F.normalize(teacher(pixel_values=pixels).image_embeds.float(), dim=-1)
        g, lam = F.normalize(gamma.float(), dim=-1), F.normalize(text, dim=-1)
        l1 = 1 - F.cosine_similarity(g @ lam.T, omega @ lam.T, dim=-1).mean()
        l2 = 1 - F.cosine_similarity(g, omega, dim=-1).mean()
        l3 = model.reconstruction_loss(scene, model.decode(tokens[:b], restore[:b]), mask[:b])
        loss = l1 + l2 + l3
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss
  return step


def sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def measure(variant, uniemox, batch, steps, windows, device):
  small = decode_variant(variant).width < 768
  model = MaskedViT(variant).to(device)
  teacher, tconfig = make_teacher(small, device) if uniemox else (None, None)
  step = step_fn(model, teacher, tconfig.image_size if tconfig else 224, uniemox)
  gen = torch.Generator(device="cpu").manual_seed(1)
  data = [torch.randn(batch, 3, 224, 224, generator=gen).to(device) for _ in range(2)]
  data.append(torch.randn(batch, 512, generator=gen).to(device))
  step(data)     # warm-up
  sync(device)
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      loss = step(data)
    sync(device)
    times.append((time.perf_counter() - start) / steps)
  assert torch.isfinite(loss).item()
  return times


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--vit", default="B/16,L/16")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--peak_tflops", type=float, default=989.4)
  args = p.parse_args()
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.backends.cuda.matmul.allow_tf32 = True
  name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
  print(f"device: {name}; torch {torch.__version__}; bf16 autocast, eager", flush=True)
  print(f"{'step':34s} {'batch':>6s} {'images/s':>9s} {'(min-max)':>17s} {'model TF/s':>8s} "
        f"{'MFU':>6s}", flush=True)
  for variant in args.vit.split(","):
    for model_name in ("mae", "uniemox"):
      times = measure(variant, model_name == "uniemox", args.batch, args.steps, args.windows,
                      device)
      rate = args.batch / statistics.median(times)
      lo, hi = args.batch / max(times), args.batch / min(times)
      teacher = flops_lib.teacher_config(variant)
      tflops = flops_lib.per_image(model_name, variant, global_batch=args.batch,
                                   teacher_cls_only=False, teacher=teacher) * rate / 1e12
      mfu = f"{tflops / args.peak_tflops:6.1%}" if device.type == "cuda" else "     -"
      print(f"{'torch ' + model_name + ' ' + variant:34s} {args.batch:6d} {rate:9.1f} "
            f"{lo:8.1f}-{hi:<8.1f} {tflops:8.2f} {mfu}", flush=True)


if __name__ == "__main__":
  main()

"""Analytic model FLOPs of the pretraining steps, the numerator of MFU.

Matrix products only (2 FLOPs per multiply-add); norms, softmax and activations are left out,
as MFU conventionally counts. A trained layer costs its forward pass three times (forward,
input gradient, weight gradient), except the patch embedding, whose input needs no gradient
(twice); the frozen teacher costs one forward pass. Rematerialization is not counted: MFU
measures the model's work, not the recomputation.
"""
from __future__ import annotations

from uniemox_jax.models import masking
from uniemox_jax.models import vit
from uniemox_jax.teacher import clip_vision

CLIP_B16 = clip_vision.VisionConfig()
# The teacher of the benchmarks' CPU smoke sizes (students narrower than B).
TINY_CLIP = clip_vision.VisionConfig(width=32, depth=1, heads=2, mlp_dim=64, patch=8,
                                     image_size=32, embed_dim=512)


def teacher_config(variant: str) -> clip_vision.VisionConfig:
  """The teacher the benchmarks pair with a student: CLIP ViT-B/16, or the tiny one."""
  return TINY_CLIP if vit.decode_variant(variant).width < 768 else CLIP_B16


def block(tokens: int, width: int, mlp: int, queries: int | None = None) -> float:
  """One pre-norm transformer block's forward; `queries` < tokens: only that many query rows
  (a CLS-only last block), keys and values still on every token."""
  q = tokens if queries is None else queries
  return 2.0 * (tokens * width * 2 * width      # k, v
                + q * width * width              # q
                + 2 * q * tokens * width         # scores and weighted values
                + q * width * width              # output projection
                + 2 * q * width * mlp)           # MLP


def teacher_forward(cls_only_last_block: bool = True,
                    c: clip_vision.VisionConfig = CLIP_B16) -> float:
  """A CLIP image tower (default: ViT-B/16's), one image."""
  n = (c.image_size // c.patch) ** 2 + 1
  total = 2.0 * (n - 1) * c.patch ** 2 * 3 * c.width
  total += (c.depth - 1) * block(n, c.width, c.mlp_dim)
  total += block(n, c.width, c.mlp_dim, 1 if cls_only_last_block else None)
  return total + 2.0 * c.width * c.embed_dim


def _encoder(variant: str, image_size: int, kept_tokens: int) -> tuple:
  """(patch-embedding forward, blocks forward) of one masked view."""
  s = vit.decode_variant(variant)
  patches = (image_size // s.patch) ** 2
  patch = 2.0 * patches * s.patch ** 2 * 3 * s.width
  return patch, s.depth * block(kept_tokens, s.width, s.mlp_dim)


def _decoder(variant: str, image_size: int, kept_tokens: int, views: int, width: int = 512,
             depth: int = 8, mlp: int = 2048) -> float:
  s = vit.decode_variant(variant)
  n = (image_size // s.patch) ** 2 + 1
  project = views * 2.0 * kept_tokens * s.width * width
  return project + depth * block(n, width, mlp) + 2.0 * n * width * s.patch ** 2 * 3


def per_image(model: str, variant: str, *, mask_ratio: float = 0.75, image_size: int = 224,
              global_batch: int = 256, teacher_cls_only: bool = True,
              teacher: clip_vision.VisionConfig = CLIP_B16, decoder_depth: int = 8,
              decoder_width: int = 512) -> float:
  """Training FLOPs per image of one step: model "uniemox" (two views, teacher, L1-L3) or
  "mae" (one view, L3 only); the decoder has `decoder_depth` blocks of `decoder_width` (the
  recipe's: 8 of 512, the teacher's embedding width)."""
  s = vit.decode_variant(variant)
  patches = (image_size // s.patch) ** 2
  kept = masking.num_kept(patches, mask_ratio) + 1
  views = 2 if model == "uniemox" else 1
  patch, blocks = _encoder(variant, image_size, kept)
  trained = views * blocks + _decoder(variant, image_size, kept, views, width=decoder_width,
                                      depth=decoder_depth, mlp=4 * decoder_width)
  total = 3.0 * trained + 2.0 * views * patch
  if model == "uniemox":
    emb = teacher.embed_dim
    fusion = 2.0 * emb * emb
    similarity = 2 * 2.0 * global_batch * emb       # student and teacher B x B logits, per row
    total += 3.0 * fusion + 2.0 * similarity + teacher_forward(teacher_cls_only, teacher)
  elif model != "mae":
    raise ValueError(f"model {model!r}: 'uniemox' or 'mae'")
  return total


def classifier_per_image(variant: str, num_classes: int, image_size: int = 224) -> float:
  """Training FLOPs per image of the fine-tuning step: the whole image through the encoder,
  pooled features through the head."""
  s = vit.decode_variant(variant)
  patches = (image_size // s.patch) ** 2
  patch, blocks = _encoder(variant, image_size, patches + 1)
  return 2.0 * patch + 3.0 * (blocks + 2.0 * s.width * num_classes)

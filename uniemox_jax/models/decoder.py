"""MAE mask decoder and the pixel (un)patchify helpers."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniemox_jax.models import vit


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, patch*patch*C], pixels ordered (row, col, channel) as in MAE."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square images."""
  b, n, _ = patches.shape
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f"{n} patches do not form a square grid")
  x = patches.reshape(b, side, side, patch, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, side * patch, side * patch, channels)


def unshuffle(visible: jax.Array, mask_token: jax.Array, ids_restore: jax.Array) -> jax.Array:
  """Visible patch tokens [B, K, W] (in masking's shuffled order) plus mask tokens for the
  rest -> [B, N, W] in the original patch order."""
  batch, kept, width = visible.shape
  n = ids_restore.shape[1]
  filler = jnp.broadcast_to(mask_token.reshape(1, 1, width), (batch, n - kept, width))
  shuffled = jnp.concatenate([visible, filler.astype(visible.dtype)], axis=1)
  return jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1)


class MaskDecoder(nn.Module):
  """MAE decoder. `project` is the encoder->decoder input projection (whose output on the CLS
  token is also UniEmoX's student token); `__call__` takes projected tokens [B, 1 + K, W] and
  the masking's `ids_restore`, and predicts patch pixels [B, N, patch*patch*3]."""
  num_patches: int
  patch: int
  width: int = 512
  depth: int = 8
  heads: int = 16
  mlp_ratio: int = 4
  # Its blocks never drop paths (the decoder is not regularized so; MAE's neither).
  student: vit.StudentConfig = vit.StudentConfig()

  def setup(self):
    c = self.student
    self.embed = nn.Dense(
        self.width, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=nn.with_logical_partitioning(vit.dense_init(), ("embed", "decoder_embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("decoder_embed",)))
    self.mask_token = self.param(
        "mask_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   (None, None, "decoder_embed")),
        (1, 1, self.width), c.param_dtype)
    self.transformer = vit.Transformer(self.depth, self.heads, self.width * self.mlp_ratio,
                                       dataclasses.replace(c, drop_path=0.0))
    self.norm = vit.layer_norm(None, c.dtype, c.param_dtype, "decoder_embed")
    self.pred = nn.Dense(
        self.patch * self.patch * 3, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=nn.with_logical_partitioning(vit.dense_init(), ("decoder_embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

  def project(self, tokens: jax.Array) -> jax.Array:
    return self.embed(tokens)

  def __call__(self, projected: jax.Array, ids_restore: jax.Array) -> jax.Array:
    width = projected.shape[-1]
    n = ids_restore.shape[1]
    if n != self.num_patches:
      raise ValueError(f"ids_restore covers {n} patches, the decoder expects {self.num_patches}")
    patches = unshuffle(projected[:, 1:], self.mask_token.astype(projected.dtype), ids_restore)
    x = jnp.concatenate([projected[:, :1], patches], axis=1)
    side = int(round(n ** 0.5))
    x = x + jnp.asarray(vit.sincos_2d(width, side, cls_token=True), x.dtype)[None]
    x = self.transformer(x, deterministic=True)
    x = self.pred(self.norm(x))
    # Predictions for the patch tokens; the CLS slot predicts nothing.
    return x[:, 1:]

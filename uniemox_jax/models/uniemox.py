"""The UniEmoX pretraining model (docs/method.md §1 and 3).

One encoder (shared weights) sees the masked scene view and the masked person view; the
decoder's input projection turns their CLS tokens into the student tokens alpha and beta (in
CLIP's 512-wide space); a fusion makes gamma; the decoder reconstructs the scene's removed
patches. Neither the frozen CLIP teacher nor the losses are part of this module: it returns
its outputs, and `uniemox_jax.objective` runs the teacher and composes L1, L2 and L3, so the
teacher's parameters can never reach the optimizer.
"""
from __future__ import annotations

import dataclasses

from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniemox_jax import losses
from uniemox_jax.models import decoder as decoder_lib
from uniemox_jax.models import fusion as fusion_lib
from uniemox_jax.models import masking
from uniemox_jax.models import vit


# Whole-model remat names beyond the block policies (vit.BLOCK_REMAT_POLICIES, applied to
# encoder and decoder alike): (encoder policy, decoder policy).
MODEL_REMAT = {"decoder": ("none", "full"), "encoder": ("full", "none")}


def remat_policies(name: "str | bool") -> Tuple[str, str]:
  """config.model.remat -> the (encoder, decoder) block policies."""
  if isinstance(name, str) and name in MODEL_REMAT:
    return MODEL_REMAT[name]
  try:
    policy = vit.block_remat(name)
  except ValueError:
    raise ValueError(f"config.model.remat={name!r}: choose one of "
                     f"{sorted(vit.BLOCK_REMAT_POLICIES) + sorted(MODEL_REMAT)}") from None
  return policy, policy


class UniEmoX(nn.Module):
  """`apply(params, scene, person, train=..., decode=..., rngs={"mask": k1, "dropout": k2})`
  -> outputs.

  scene, person: [B, H, W, 3] student-normalized views. outputs holds alpha, beta, gamma
  (student tokens, [B, decoder_width], in CLIP's embedding space), mask [B, N] (scene,
  1 = removed), person_mask and, with `decode`, prediction [B, N, p*p*3] (the decoder's
  reconstruction of the scene) and target (its reconstruction target, `norm_pix_loss`
  applied). The losses are not computed here: `uniemox_jax.objective` composes them.
  """
  variant: str = "B/16"
  image_size: int = 224
  mask_ratio: float = 0.75
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  fusion: str = "easy"
  fusion_heads: int = 8
  norm_pix_loss: bool = False
  # Its remat is a block policy, or "encoder" / "decoder" (MODEL_REMAT): the policy there only.
  student: vit.StudentConfig = vit.StudentConfig()

  def setup(self):
    c = self.student
    encoder_remat, decoder_remat = remat_policies(c.remat)
    self.encoder = vit.Encoder(self.variant, self.image_size,
                               student=dataclasses.replace(c, remat=encoder_remat))
    self.decoder = decoder_lib.MaskDecoder(
        self.encoder.num_patches, self.encoder.shape.patch, self.decoder_width,
        self.decoder_depth, self.decoder_heads,
        student=dataclasses.replace(c, remat=decoder_remat))
    self.fuse = fusion_lib.get_fusion(self.fusion)(
        dtype=c.dtype, param_dtype=c.param_dtype, heads=self.fusion_heads)

  def __call__(self, scene: jax.Array, person: jax.Array, *, train: bool = True,
               decode: bool = True) -> Dict[str, jax.Array]:
    if scene.shape != person.shape:
      raise ValueError(f"scene {scene.shape} and person {person.shape} views differ in shape")
    batch = scene.shape[0]
    n = self.encoder.num_patches
    # Both views go through the shared encoder as one batch of 2B, each masked independently.
    views = jnp.concatenate([scene, person], axis=0)
    m = masking.random_masking(self.make_rng("mask"), 2 * batch, n, self.mask_ratio)
    tokens, _ = self.encoder(views, m.ids_keep, train=train)
    projected = self.decoder.project(tokens)
    alpha, beta = projected[:batch, 0], projected[batch:, 0]
    outputs = {"alpha": alpha, "beta": beta, "gamma": self.fuse(alpha, beta),
               "mask": m.mask[:batch], "person_mask": m.mask[batch:]}
    if decode:
      # The decoder only runs when reconstruction is part of the objective.
      outputs["prediction"] = self.decoder(projected[:batch], m.ids_restore[:batch])
      outputs["target"] = losses.reconstruction_target(
          decoder_lib.patchify(scene, self.encoder.shape.patch), self.norm_pix_loss)
    return outputs

  def embed(self, scene: jax.Array, person: jax.Array) -> Dict[str, jax.Array]:
    """The student tokens of unmasked views (inference): alpha, beta and the fused gamma,
    which live in CLIP's embedding space (zero-shot classification reads gamma)."""
    batch = scene.shape[0]
    tokens, _ = self.encoder(jnp.concatenate([scene, person], axis=0), train=False)
    projected = self.decoder.project(tokens)
    alpha, beta = projected[:batch, 0], projected[batch:, 0]
    return {"alpha": alpha, "beta": beta, "gamma": self.fuse(alpha, beta)}

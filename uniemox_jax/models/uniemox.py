"""The UniEmoX pretraining model (docs/method.md §1 and 3).

One encoder (shared weights) sees the masked scene view and the masked person view; the
decoder's input projection turns their CLS tokens into the student tokens alpha and beta (in
CLIP's 512-wide space); a fusion makes gamma; the decoder reconstructs the scene's removed
patches. The frozen CLIP teacher is not part of this module: its outputs (image embedding
omega, text embeddings lambda, logit scale) come in as arrays, so its parameters can never
reach the optimizer. See `uniemox_jax.objective` for the function that runs both.
"""
from __future__ import annotations

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
  """`apply(params, scene, person, text_emb, image_emb, logit_scale, train=..., rngs={"mask":
  k1, "dropout": k2})` -> `(losses, aux)`.

  scene, person: [B, H, W, 3] student-normalized views. text_emb, image_emb: [B, D] teacher
  embeddings (normalized here, so raw CLIP features are fine). losses holds "l1", "l2", "l3"
  and "total" (the weighted sum of the enabled terms); aux holds alpha, beta, gamma
  (student tokens), mask [B, N] (scene, 1 = removed), person_mask and, when L3 is on,
  prediction [B, N, p*p*3] and target (the reconstruction target).
  """
  variant: str = "B/16"
  image_size: int = 224
  mask_ratio: float = 0.75
  drop_path: float = 0.0
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  fusion: str = "easy"
  fusion_heads: int = 8
  norm_pix_loss: bool = False
  l1_group_size: int = 0        # rows per L1 group (0: the whole batch); see models.l1_group_size
  # ((name, weight), ...): a tuple so the module stays hashable; a weight of 0 disables a term.
  loss_weights: Tuple[Tuple[str, float], ...] = (("l1", 1.0), ("l2", 1.0), ("l3", 1.0))
  remat: "str | bool" = "none"   # a block policy, or "encoder" / "decoder" (MODEL_REMAT)
  scan: bool = False
  dtype: vit.Dtype = jnp.float32
  param_dtype: vit.Dtype = jnp.float32
  attention: str = "auto"
  attention_pad: int = 0

  def setup(self):
    encoder_remat, decoder_remat = remat_policies(self.remat)
    self.encoder = vit.Encoder(self.variant, self.image_size, self.drop_path,
                               remat=encoder_remat, scan=self.scan, dtype=self.dtype,
                               param_dtype=self.param_dtype, attention=self.attention,
                               attention_pad=self.attention_pad)
    self.decoder = decoder_lib.MaskDecoder(
        self.encoder.num_patches, self.encoder.shape.patch, self.decoder_width,
        self.decoder_depth, self.decoder_heads, remat=decoder_remat, scan=self.scan,
        dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
        attention_pad=self.attention_pad)
    self.fuse = fusion_lib.get_fusion(self.fusion)(
        dtype=self.dtype, param_dtype=self.param_dtype, heads=self.fusion_heads)

  def __call__(self, scene: jax.Array, person: jax.Array, text_emb: jax.Array,
               image_emb: jax.Array, logit_scale: jax.Array | float = 1.0, *,
               train: bool = True) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
    if scene.shape != person.shape:
      raise ValueError(f"scene {scene.shape} and person {person.shape} views differ in shape")
    batch = scene.shape[0]
    for name, emb in (("text_emb", text_emb), ("image_emb", image_emb)):
      if emb.shape != (batch, self.decoder_width):
        raise ValueError(f"{name} must be [batch, {self.decoder_width}] (the teacher's "
                         f"embedding width = decoder width), got {emb.shape}")
    n = self.encoder.num_patches
    # Both views go through the shared encoder as one batch of 2B, each masked independently.
    views = jnp.concatenate([scene, person], axis=0)
    m = masking.random_masking(self.make_rng("mask"), 2 * batch, n, self.mask_ratio)
    tokens, _ = self.encoder(views, m.ids_keep, train=train)
    projected = self.decoder.project(tokens)
    alpha, beta = projected[:batch, 0], projected[batch:, 0]
    gamma = self.fuse(alpha, beta)
    scene_mask = m.mask[:batch]
    aux = {"alpha": alpha, "beta": beta, "gamma": gamma, "mask": scene_mask,
           "person_mask": m.mask[batch:]}
    # L1 and L2 are cheap and always reported; a weight of 0 only keeps them out of the total.
    terms = {
        "l1": losses.similarity_distillation_loss(gamma, image_emb, text_emb, logit_scale,
                                                  self.l1_group_size),
        "l2": losses.embedding_cosine_loss(gamma, image_emb),
    }
    weights = dict(self.loss_weights)
    if weights.get("l3", 0.0):
      # The decoder only runs when reconstruction is part of the objective.
      aux["prediction"] = self.decoder(projected[:batch], m.ids_restore[:batch])
      aux["target"] = losses.reconstruction_target(
          decoder_lib.patchify(scene, self.encoder.shape.patch), self.norm_pix_loss)
      terms["l3"] = losses.masked_reconstruction_loss(aux["prediction"], aux["target"],
                                                      scene_mask)
    terms["total"] = losses.total_loss(terms, weights)
    return terms, aux

  def embed(self, scene: jax.Array, person: jax.Array) -> Dict[str, jax.Array]:
    """The student tokens of unmasked views (inference): alpha, beta and the fused gamma,
    which live in CLIP's embedding space (zero-shot classification reads gamma)."""
    batch = scene.shape[0]
    tokens, _ = self.encoder(jnp.concatenate([scene, person], axis=0), train=False)
    projected = self.decoder.project(tokens)
    alpha, beta = projected[:batch, 0], projected[batch:, 0]
    return {"alpha": alpha, "beta": beta, "gamma": self.fuse(alpha, beta)}

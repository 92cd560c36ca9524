"""The three UniEmoX losses (docs/method.md §3). All computed in float32.

Shapes: g (student, fused token) [B, D], omega (CLIP image embedding) [B, D], lam (CLIP text
embeddings) [B, D]. Under `jax.jit` over a sharded batch, B is the global batch, so the B x B
logits of L1 span every device's examples, as the method asks.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

_EPS = 1e-8


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def _row_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def similarity_distillation_loss(g: jax.Array, omega: jax.Array, lam: jax.Array,
                                 logit_scale: jax.Array | float = 1.0,
                                 group_size: int = 0) -> jax.Array:
  """L1 = 1 - mean_i cos(A_i, C_i), A = s g lam^T (student), C = s omega lam^T (teacher).

  Row i of A compares image i's student token with every text of its group; the diagonal is
  its own text. Cosine makes the logit scale s cancel; it is kept so the logits are CLIP's own.
  `group_size` (0: the whole batch) splits the rows into consecutive groups, each compared
  within itself: the batch's rows per device give the reference's per-GPU L1.
  """
  g, omega, lam = l2_normalize(g), l2_normalize(omega), l2_normalize(lam)
  s = jnp.asarray(logit_scale, jnp.float32)
  rows = g.shape[0]
  n = group_size if 0 < group_size < rows else rows
  if rows % n:
    raise ValueError(f"L1 group size {n} does not divide the {rows} rows of the batch")
  g, omega, lam = (x.reshape(rows // n, n, x.shape[-1]) for x in (g, omega, lam))
  student = s * jnp.einsum("gid,gjd->gij", g, lam)
  teacher = s * jnp.einsum("gid,gjd->gij", omega, lam)
  return 1.0 - jnp.mean(_row_cosine(student, teacher))


def embedding_cosine_loss(g: jax.Array, omega: jax.Array) -> jax.Array:
  """L2 = 1 - mean_i cos(g_i, omega_i)."""
  return 1.0 - jnp.mean(_row_cosine(g, omega))


def patch_statistics(patches: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(mean, scale) of each patch as norm_pix_loss uses them: the mean and sqrt(unbiased
  variance + 1e-6) (N - 1, torch's default, as MAE computes it)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return mean, jnp.sqrt(var + 1e-6)


def reconstruction_target(patches: jax.Array, norm_pix_loss: bool) -> jax.Array:
  """MAE's target: the patch pixels, optionally normalized per patch (`norm_pix_loss`) by
  their `patch_statistics`."""
  patches = patches.astype(jnp.float32)
  if not norm_pix_loss:
    return patches
  mean, scale = patch_statistics(patches)
  return (patches - mean) / scale


def masked_reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """L3: per-patch mean squared error, averaged over the removed patches (mask == 1) only."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)

"""MAE random masking as a pure function of a PRNG key."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
  ids_keep: jax.Array     # [B, K] int32: patch indices that stay visible, in shuffled order
  ids_restore: jax.Array  # [B, N] int32: inverse permutation of the shuffle
  mask: jax.Array         # [B, N] float32: 1 = removed (to reconstruct), 0 = visible


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """The static number of visible patches: `int(N * (1 - ratio))`, as MAE computes it."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  keep = int(num_patches * (1 - mask_ratio))
  if keep < 1:
    raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of {num_patches}")
  return keep


def random_masking(key: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Masking:
  """Per-sample uniform noise, argsort, keep the first `num_kept` patches."""
  keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(key, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  mask = (ids_restore >= keep).astype(jnp.float32)
  return Masking(ids_shuffle[:, :keep], ids_restore, mask)

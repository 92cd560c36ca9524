"""Mask decoder pieces: patchify round trip, unshuffle placement, output shapes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax.models import decoder
from uniemox_jax.models import masking


def test_patchify_layout_and_round_trip():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  patches = decoder.patchify(images, 8)
  assert patches.shape == (2, 16, 8 * 8 * 3)
  # Patch (row 1, col 2) is grid index 1 * 4 + 2, pixels in (row, col, channel) order.
  np.testing.assert_array_equal(patches[1, 6], np.asarray(images[1, 8:16, 16:24]).reshape(-1))
  np.testing.assert_array_equal(decoder.unpatchify(patches, 8), images)


def test_unshuffle_puts_visible_tokens_back_in_place():
  m = masking.random_masking(jax.random.key(1), 3, 16, 0.75)
  # Token value = its original patch index, gathered in the masking's shuffled order.
  all_tokens = jnp.tile(jnp.arange(16, dtype=jnp.float32)[None, :, None], (3, 1, 2))
  visible = jnp.take_along_axis(all_tokens, m.ids_keep[:, :, None], axis=1)
  out = decoder.unshuffle(visible, jnp.full((1, 1, 2), -1.0), m.ids_restore)
  expect = np.where(np.asarray(m.mask)[:, :, None] > 0, -1.0, np.asarray(all_tokens))
  np.testing.assert_array_equal(out, expect)


def test_decoder_predicts_every_patch():
  m = masking.random_masking(jax.random.key(2), 2, 16, 0.75)
  dec = decoder.MaskDecoder(num_patches=16, patch=8, width=32, depth=1, heads=2)
  tokens = jax.random.normal(jax.random.key(3), (2, 1 + 4, 64))

  def run(module, x):
    return module(module.project(x), m.ids_restore)
  params = dec.init(jax.random.key(4), tokens, method=run)
  pred = dec.apply(params, tokens, method=run)
  assert pred.shape == (2, 16, 8 * 8 * 3)
  assert set(nn.unbox(params)["params"]) == {"embed", "mask_token", "transformer", "norm",
                                             "pred"}

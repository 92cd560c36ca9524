"""MAE random masking invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax import losses
from uniemox_jax.models import masking


@pytest.mark.parametrize("ratio,kept", [(0.75, 49), (0.90, 19)])
def test_static_keep_count_and_inverse_permutation(ratio, kept):
  m = masking.random_masking(jax.random.key(0), 4, 196, ratio)
  assert m.ids_keep.shape == (4, kept) and kept == int(196 * (1 - ratio))
  mask = np.asarray(m.mask)
  np.testing.assert_array_equal(mask.sum(axis=1), 196 - kept)
  restore = np.asarray(m.ids_restore)
  keep = np.asarray(m.ids_keep)
  for b in range(4):
    # ids_restore is a permutation whose first `kept` shuffled slots are exactly ids_keep.
    assert sorted(restore[b]) == list(range(196))
    shuffle = np.argsort(restore[b])
    np.testing.assert_array_equal(shuffle[restore[b]], np.arange(196))
    np.testing.assert_array_equal(shuffle[:kept], keep[b])
    # The visible patches are the unmasked ones.
    assert set(keep[b]) == set(np.flatnonzero(mask[b] == 0))


def test_keys_decide_the_mask():
  a = masking.random_masking(jax.random.key(1), 2, 196, 0.75).mask
  b = masking.random_masking(jax.random.key(1), 2, 196, 0.75).mask
  c = masking.random_masking(jax.random.key(2), 2, 196, 0.75).mask
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Per-sample noise: two samples of one batch get different masks.
  assert not np.array_equal(a[0], a[1])


def test_loss_counts_exactly_the_removed_patches():
  m = masking.random_masking(jax.random.key(3), 2, 16, 0.75)
  target = jax.random.normal(jax.random.key(4), (2, 16, 12))
  removed = m.mask[:, :, None] > 0
  # Error 2 on every removed patch, garbage on visible ones: the loss sees only the former.
  pred = jnp.where(removed, target + 2.0, target + 1e3)
  np.testing.assert_allclose(losses.masked_reconstruction_loss(pred, target, m.mask), 4.0,
                             rtol=1e-6)


@pytest.mark.parametrize("ratio", [1.0, 0.999, -0.1])
def test_bad_ratio_is_reported(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.random_masking(jax.random.key(0), 1, 196, ratio)

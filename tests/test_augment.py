"""On-device augmentation: normalization, random erasing, mixup/cutmix, label smoothing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax import augment


def _images(b=8, s=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, s, s, 3))


def test_normalize():
  x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  expect = (1.0 - np.asarray(augment.IMAGENET_MEAN)) / np.asarray(augment.IMAGENET_STD)
  np.testing.assert_allclose(augment.normalize(x)[0, 0, 0], expect, rtol=1e-6)
  assert augment.normalize(x, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_random_erasing_replaces_one_rectangle():
  x = _images(b=32)
  out = np.asarray(jax.jit(lambda k, x: augment.random_erasing(k, x, prob=1.0))(
      jax.random.key(1), x))
  np.testing.assert_array_equal(augment.random_erasing(jax.random.key(1), x, prob=0.0), x)
  erased = 0
  for i in range(32):
    changed = np.any(out[i] != np.asarray(x[i]), axis=-1)
    if not changed.any():
      continue       # no attempt fitted (possible for tall/wide draws on a small image)
    erased += 1
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert changed.sum() == h * w                       # one solid rectangle
    assert 0.02 * 256 * 0.5 <= h * w <= 256 / 3 * 1.5   # area within the scale range
  assert erased >= 28
  erase = jax.jit(lambda k: augment.random_erasing(k, x[:1], prob=0.25))    # one compile
  rate = np.mean([np.any(erase(jax.random.key(k)) != x[:1]) for k in range(200)])
  assert 0.12 < rate < 0.35


def test_smooth_targets():
  t = augment.smooth_targets(jnp.asarray([2, 0]), 4, 0.1)
  np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


def test_mixup_mixes_images_and_targets_with_one_lambda():
  x = _images()
  y = augment.smooth_targets(jnp.arange(8) % 4, 4, 0.0)
  out, t = augment.mixup_cutmix(jax.random.key(3), x, y, switch_prob=0.0)
  lam = float(t[0, 0])                 # sample 0 is class 0, its partner (sample 7) class 3
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(t[0, 3], 1 - lam, rtol=1e-5)
  np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-5)


def test_cutmix_pastes_a_box_and_corrects_lambda():
  x = _images()
  y = augment.smooth_targets(jnp.arange(8) % 4, 4, 0.0)
  for seed in range(5):
    out, t = augment.mixup_cutmix(jax.random.key(seed), x, y, switch_prob=1.0)
    from_partner = np.all(np.asarray(out) == np.asarray(x[::-1]), axis=-1)
    from_self = np.all(np.asarray(out) == np.asarray(x), axis=-1)
    assert np.all(from_partner | from_self)
    box = from_partner[0]
    lam = float(t[0, 0])
    np.testing.assert_allclose(lam, 1 - box.sum() / box.size, rtol=1e-5)
    np.testing.assert_array_equal(from_partner, np.broadcast_to(box, from_partner.shape))


def test_no_mixing_when_prob_is_zero():
  x = _images()
  y = augment.smooth_targets(jnp.arange(8) % 4, 4, 0.1)
  out, t = augment.mixup_cutmix(jax.random.key(0), x, y, prob=0.0)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_allclose(t, y, rtol=1e-6)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_single_mode_configs_jit(mixup, cutmix):
  x = _images()
  y = augment.smooth_targets(jnp.arange(8) % 4, 4, 0.1)
  fn = jax.jit(lambda k: augment.mixup_cutmix(k, x, y, mixup_alpha=mixup, cutmix_alpha=cutmix))
  out, t = fn(jax.random.key(0))
  assert out.shape == x.shape and t.shape == y.shape
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-5)

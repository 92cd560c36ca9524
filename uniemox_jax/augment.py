"""On-device image preprocessing that runs inside the jitted step: normalization, random
erasing, mixup/cutmix with label smoothing (timm's semantics, batch mode).

The host pipeline (`data_pipelines.input_pipeline`) sends uint8 images; everything here is a
pure function of a PRNG key and the global batch, with static shapes.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype=jnp.float32) -> jax.Array:
  """uint8 [..., H, W, C] in 0..255 -> (x / 255 - mean) / std."""
  shape = (1,) * (images.ndim - 1) + (-1,)
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32).reshape(shape)) / jnp.asarray(
      std, jnp.float32).reshape(shape)
  return x.astype(dtype)


def renormalize(images: jax.Array, src: Sequence[Sequence[float]],
                dst: Sequence[Sequence[float]]) -> jax.Array:
  """Maps images normalized with (mean, std) `src` to normalization `dst`, on device."""
  def channels(values):
    return jnp.asarray(values, images.dtype).reshape((1,) * (images.ndim - 1) + (-1,))
  (src_mean, src_std), (dst_mean, dst_std) = src, dst
  raw = images * channels(src_std) + channels(src_mean)
  return (raw - channels(dst_mean)) / channels(dst_std)


def _erase_box(key, height: int, width: int, scale, ratio, attempts: int = 10):
  """timm RandomErasing's box: up to `attempts` draws, the first that fits; (valid, y, x, h, w)."""
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (attempts,), minval=scale[0],
                                             maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (attempts,), minval=jnp.log(ratio[0]),
                             maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_r)
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width) & (h > 0) & (w > 0)
  first = jnp.argmax(fits)
  h, w, valid = h[first], w[first], fits[first]
  y = jax.random.randint(k_y, (), 0, jnp.maximum(height - h, 0) + 1)
  x = jax.random.randint(k_x, (), 0, jnp.maximum(width - w, 0) + 1)
  return valid, y, x, h, w


def random_erasing(key: jax.Array, images: jax.Array, prob: float = 0.25,
                   scale: Tuple[float, float] = (0.02, 1 / 3),
                   ratio: Tuple[float, float] = (0.3, 3.3)) -> jax.Array:
  """timm's RandomErasing(mode="pixel", count 1) on normalized images [B, H, W, C]: with
  probability `prob` per image, one random rectangle becomes N(0, 1) noise."""
  if prob <= 0:
    return images
  batch, height, width, _ = images.shape

  def one(k, img):
    k_apply, k_box, k_noise = jax.random.split(k, 3)
    valid, y, x, h, w = _erase_box(k_box, height, width, scale, ratio)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w)
    erase = inside & valid & (jax.random.uniform(k_apply) < prob)
    noise = jax.random.normal(k_noise, img.shape, img.dtype)
    return jnp.where(erase[:, :, None], noise, img)
  return jax.vmap(one)(jax.random.split(key, batch), images)


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """Integer labels [B] -> one-hot with label smoothing: off = s / C, on = 1 - s + s / C."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def mixup_cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0) -> Tuple[jax.Array, jax.Array]:
  """timm's Mixup in batch mode: one lambda per batch, partner = the batch reversed. With
  probability `switch_prob` cutmix (a box pasted from the partner, lambda corrected to the
  box's area) instead of mixup; with probability 1 - `prob`, no mixing. `targets` [B, C] are
  soft (one-hot, smoothed or multi-hot) and mixed with the same lambda."""
  batch, height, width, _ = images.shape
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
  use_cutmix = (jax.random.uniform(k_switch) < switch_prob) if cutmix_alpha > 0 else False
  if mixup_alpha <= 0:
    use_cutmix = True
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  apply = jax.random.uniform(k_apply) < prob

  # Cutmix box (timm's rand_bbox): side ratio sqrt(1 - lam), centre uniform, clipped.
  cut = jnp.sqrt(1.0 - lam_cut)
  cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)

  partner = images[::-1]
  mixed_cut = jnp.where(box[None, :, :, None], partner, images)
  lam_m = jnp.asarray(lam_mix, images.dtype)
  mixed_up = images * lam_m + partner * (1 - lam_m)
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  lam = jnp.where(apply, lam, 1.0)
  out = jnp.where(apply, jnp.where(use_cutmix, mixed_cut, mixed_up), images)
  mixed_targets = targets * lam + targets[::-1] * (1.0 - lam)
  return out, mixed_targets.astype(targets.dtype)

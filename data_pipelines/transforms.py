"""Host-side image transforms (PIL + NumPy), with the semantics of torchvision/timm where the
recipes come from. They return uint8 HWC arrays: normalization, random erasing and
mixup/cutmix run on device (`uniemox_jax.augment`), which keeps host work and host-to-device
bytes at a quarter of float32.

Every random transform takes a `np.random.Generator`, so grain's per-record seeding makes the
output a pure function of (seed, record index), whatever the number of workers.
"""
from __future__ import annotations

import io
import math
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BICUBIC = Image.BICUBIC
Box = Tuple[float, float, float, float]   # x, y, width, height in pixels


def decode(data: bytes) -> Image.Image:
  img = Image.open(io.BytesIO(data))
  return img.convert("RGB") if img.mode != "RGB" else img


def open_lazy(data: bytes) -> Image.Image:
  """The image with its header read and its pixels not yet decoded: `.size` is known, so the
  crop boxes can be drawn before deciding how finely to decode (`decode_for_boxes`)."""
  return Image.open(io.BytesIO(data))


def decode_for_boxes(img: Image.Image, boxes: Sequence[Box], size: int,
                     draft: bool = True) -> Tuple[Image.Image, List[Box]]:
  """Decodes a lazily opened image just finely enough that each box, once scaled, still holds
  at least `size` x `size` source pixels, and returns it with the boxes in its coordinates.

  JPEG's decoder can produce 1/2, 1/4 or 1/8 of the image directly from the DCT coefficients
  (PIL's draft mode), skipping most of the decode when every crop is far smaller than the
  stored image. The crops then resample from the reduced image: close to, not equal to, a
  full decode. Other formats, and `draft=False`, decode fully (boxes unchanged)."""
  width, height = img.size
  if draft and img.format == "JPEG" and boxes:
    scale = max(max(size / max(b[2], 1), size / max(b[3], 1)) for b in boxes)
    if scale < 0.5:    # a reduction is possible
      img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
  if img.mode != "RGB":
    img = img.convert("RGB")
  else:
    img.load()
  if img.size == (width, height):
    return img, list(boxes)
  sx, sy = img.size[0] / width, img.size[1] / height
  return img, [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in boxes]


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
  """torchvision's RandomResizedCrop.get_params: 10 tries at a random area and log-uniform
  aspect ratio, then a center crop at the clamped ratio."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def crop_resize(img: Image.Image, box: Box, size: int) -> Image.Image:
  """Crop `box` and resize it to size x size in one resampling pass (bicubic)."""
  x, y, w, h = box
  return img.resize((size, size), BICUBIC, box=(x, y, x + w, y + h))


def person_box_pixels(img_or_size, rel_box: Sequence[float]) -> Box:
  """Relative [ymin, xmin, ymax, xmax] -> pixel (x, y, w, h), at least one pixel wide, for an
  image (or its (width, height))."""
  width, height = getattr(img_or_size, "size", img_or_size)
  ymin, xmin, ymax, xmax = (float(v) for v in rel_box)
  x0, y0 = int(math.floor(xmin * width)), int(math.floor(ymin * height))
  x1, y1 = int(math.ceil(xmax * width)), int(math.ceil(ymax * height))
  x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
  return x0, y0, max(1, min(x1, width) - x0), max(1, min(y1, height) - y0)


# The eval crop's share of the resized image: 224 of 256 (timm's crop_pct).
EVAL_CROP_PCT = 0.875


def eval_resize(crop: int) -> int:
  """The shorter side the eval transform resizes to before cropping `crop`: 224 -> 256."""
  return int(round(crop / EVAL_CROP_PCT))


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
  """torchvision Resize(resize) (shorter side, bicubic) then CenterCrop(crop)."""
  width, height = img.size
  if width <= height:
    new = (resize, int(resize * height / width))
  else:
    new = (int(resize * width / height), resize)
  img = img.resize(new, BICUBIC)
  left = int(round((new[0] - crop) / 2.0))
  top = int(round((new[1] - crop) / 2.0))
  return img.crop((left, top, left + crop, top + crop))


def to_array(img: Image.Image, flip: bool = False) -> np.ndarray:
  """uint8 HWC, optionally mirrored left-right (by PIL: 10x faster than a NumPy copy)."""
  if flip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(img, dtype=np.uint8)


# RandAugment (timm's "rand-m9-mstd0.5-inc1", the MAE fine-tuning recipe): two ops per image,
# each applied with probability 0.5, magnitude drawn from N(9, 0.5) clipped to [0, 10], the
# "increasing" op variants whose strength grows with the magnitude.
_MAX_LEVEL = 10.0
_FILL = (124, 116, 104)   # ImageNet mean in uint8, for geometric ops


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


def _whole(op):
  """An op that takes no magnitude (AutoContrast, Equalize, Invert)."""
  return lambda img, m, rng: op(img)


def _op_rotate(img, m, rng):
  return img.rotate(_signed(m / _MAX_LEVEL * 30.0, rng), resample=Image.BILINEAR, fillcolor=_FILL)


def _op_posterize(img, m, rng):
  return ImageOps.posterize(img, max(1, 4 - int(m / _MAX_LEVEL * 4)))


def _op_solarize(img, m, rng):
  return ImageOps.solarize(img, 256 - int(m / _MAX_LEVEL * 256))


def _op_solarize_add(img, m, rng):
  add = int(m / _MAX_LEVEL * 110)
  arr = np.asarray(img, np.int16)
  out = np.where(arr < 128, np.minimum(arr + add, 255), arr).astype(np.uint8)
  return Image.fromarray(out)


def _enhance(kind):
  def op(img, m, rng):
    return kind(img).enhance(1.0 + _signed(m / _MAX_LEVEL * 0.9, rng))
  return op


def _op_shear_x(img, m, rng):
  return _affine(img, (1, _signed(m / _MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _op_shear_y(img, m, rng):
  return _affine(img, (1, 0, 0, _signed(m / _MAX_LEVEL * 0.3, rng), 1, 0))


def _op_translate_x(img, m, rng):
  return _affine(img, (1, 0, _signed(m / _MAX_LEVEL * 0.45, rng) * img.size[0], 0, 1, 0))


def _op_translate_y(img, m, rng):
  return _affine(img, (1, 0, 0, 0, 1, _signed(m / _MAX_LEVEL * 0.45, rng) * img.size[1]))


RAND_AUGMENT_OPS = {
    "AutoContrast": _whole(ImageOps.autocontrast), "Equalize": _whole(ImageOps.equalize),
    "Invert": _whole(ImageOps.invert),
    "Rotate": _op_rotate, "PosterizeIncreasing": _op_posterize,
    "SolarizeIncreasing": _op_solarize, "SolarizeAdd": _op_solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _op_shear_x, "ShearY": _op_shear_y,
    "TranslateXRel": _op_translate_x, "TranslateYRel": _op_translate_y,
}


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> Image.Image:
  names = list(RAND_AUGMENT_OPS)
  for i in rng.choice(len(names), num_ops, replace=True):
    if rng.random() > prob:
      continue
    m = magnitude
    if magnitude_std > 0:
      m = float(np.clip(rng.normal(magnitude, magnitude_std), 0.0, _MAX_LEVEL))
    img = RAND_AUGMENT_OPS[names[i]](img, m, rng)
  return img

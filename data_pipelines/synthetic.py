"""A synthetic emotion dataset whose classes can be learnt: the demo's and the tests' data.

Each of the eight Mikels classes has its own palette, background pattern and object shape;
most images contain a drawn "person" (head and body) whose box is recorded, and every image
gets EmoSet-style attributes from which the prompt is built. The output is exactly what the
real datasets look like to the converter: a split tree plus side files,

  <out>/{train,val,test}/<class>/<class>_<n>.jpg
  <out>/boxes.json        {relative path: [x1, y1, x2, y2] in pixels, or null}
  <out>/attributes.json   {relative path: {scene, objects, brightness, ...}}

  python -m uniemox_jax.tools.convert --source synthetic --name synthetic --out /tmp/synth
      # the tree under /tmp/synth/raw, converted beside it
"""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import convert
from data_pipelines import sources
from data_pipelines import storage
from data_pipelines import verify

CLASSES = sources.EMOSET_CLASSES
# Per class: background RGB, object RGB, object shape, background pattern, scenes, expression.
_STYLE = {
    "amusement": ((250, 200, 60), (230, 60, 140), "circle", "dots", ("amusement park",
                                                                     "circus"), "happiness"),
    "awe": ((40, 80, 170), (240, 240, 255), "triangle", "gradient", ("mountain", "sky"),
            "surprise"),
    "contentment": ((120, 190, 110), (250, 240, 200), "ellipse", "plain", ("garden", "lawn"),
                    "neutral"),
    "excitement": ((250, 120, 30), (255, 255, 80), "star", "stripes", ("stadium", "concert"),
                   "happiness"),
    "anger": ((170, 20, 20), (30, 30, 30), "square", "stripes", ("street", "battlefield"),
              "anger"),
    "disgust": ((110, 120, 40), (90, 60, 30), "blob", "dots", ("garbage dump", "swamp"),
                "disgust"),
    "fear": ((20, 20, 30), (150, 150, 170), "triangle", "checker", ("forest path", "alley"),
             "fear"),
    "sadness": ((100, 110, 130), (60, 70, 90), "square", "gradient", ("cemetery", "rainy street"),
                "sadness"),
}
_OBJECTS = ("tree", "car", "dog", "building", "flower", "cloud", "bird", "lamp")
_ACTIONS = ("standing", "walking", "sitting", "waving")
PERSON_PROB = 0.8


def _background(size: int, style, rng: np.random.Generator) -> np.ndarray:
  base, _, _, pattern, _, _ = style
  img = np.empty((size, size, 3), np.float32)
  img[:] = np.asarray(base, np.float32) * rng.uniform(0.8, 1.1)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  if pattern == "gradient":
    img *= (0.5 + 0.7 * yy)[..., None]
  elif pattern == "stripes":
    img *= (0.75 + 0.25 * (np.sin(xx * rng.uniform(12, 20) + yy * 3) > 0))[..., None]
  elif pattern == "checker":
    img *= (0.7 + 0.3 * ((np.floor(xx * 6) + np.floor(yy * 6)) % 2))[..., None]
  elif pattern == "dots":
    img *= (0.8 + 0.2 * (np.sin(xx * 30) * np.sin(yy * 30) > 0.5))[..., None]
  img += rng.normal(0, 8, img.shape)
  return np.clip(img, 0, 255)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
  x1, y1, x2, y2 = box
  if shape == "circle" or shape == "blob":
    draw.ellipse(box, fill=color)
  elif shape == "ellipse":
    draw.ellipse((x1, y1 + (y2 - y1) / 4, x2, y2 - (y2 - y1) / 4), fill=color)
  elif shape == "square":
    draw.rectangle(box, fill=color)
  elif shape == "triangle":
    draw.polygon([((x1 + x2) / 2, y1), (x1, y2), (x2, y2)], fill=color)
  elif shape == "star":
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    pts = [(cx + (r if i % 2 == 0 else r / 2.5) * np.cos(np.pi * i / 5 - np.pi / 2),
            cy + (r if i % 2 == 0 else r / 2.5) * np.sin(np.pi * i / 5 - np.pi / 2))
           for i in range(10)]
    draw.polygon(pts, fill=color)


def render(cls: str, size: int, rng: np.random.Generator):
  """One image of class `cls`: (PIL image, person box or None, attributes)."""
  style = _STYLE[cls]
  _, obj_color, shape, _, scenes, expression = style
  img = Image.fromarray(_background(size, style, rng).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(2, 5))):
    s = rng.uniform(0.12, 0.3) * size
    x, y = rng.uniform(0, size - s, 2)
    color = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in obj_color)
    _draw_shape(draw, shape, (x, y, x + s, y + s), color)
  box = None
  attrs: Dict = {"scene": scenes[int(rng.integers(len(scenes)))],
                 "objects": list(rng.choice(_OBJECTS, int(rng.integers(1, 4)), replace=False))}
  if rng.random() < PERSON_PROB:
    h = rng.uniform(0.35, 0.7) * size
    w = h * rng.uniform(0.35, 0.5)
    x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    skin = (230, 190, 160)
    shirt = tuple(int(v) for v in rng.integers(0, 256, 3))
    head = h * 0.28
    draw.ellipse((x1 + (w - head) / 2, y1, x1 + (w + head) / 2, y1 + head), fill=skin)
    draw.rectangle((x1, y1 + head, x1 + w, y1 + h), fill=shirt)
    box = [round(float(x1), 2), round(float(y1), 2), round(float(x1 + w), 2),
           round(float(y1 + h), 2)]
    attrs["objects"] = ["person"] + attrs["objects"]
    attrs["facial_expression"] = expression
    attrs["human_action"] = _ACTIONS[int(rng.integers(len(_ACTIONS)))]
  pixels = np.asarray(img, np.float32)
  attrs["brightness"] = round(float(pixels.mean() / 255), 1)
  attrs["colorfulness"] = round(float(np.clip(pixels.std(axis=2).mean() / 80, 0, 1)), 1)
  return img, box, attrs


def generate(out: str, per_class: Sequence[int] = (40, 8, 8), size: int = 64,
             seed: int = 0, quality: int = 92) -> str:
  """Writes the dataset (see the module docstring); returns `out`. Deterministic in `seed`."""
  if len(per_class) != 3 or min(per_class) < 0:
    raise ValueError(f"--per_class {list(per_class)} must be three counts: train,val,test")
  boxes, attributes = {}, {}
  for s, (split, n) in enumerate(zip(sources.SPLITS, per_class)):
    for c, cls in enumerate(CLASSES):
      if not n:
        continue
      folder = os.path.join(out, split, cls)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        rng = np.random.default_rng([seed, s, c, i])
        img, box, attrs = render(cls, size, rng)
        rel = os.path.join(split, cls, f"{cls}_{i:05d}.jpg")
        img.save(os.path.join(out, rel), format="JPEG", quality=quality)
        boxes[rel], attributes[rel] = box, attrs
  for name, data in (("boxes.json", boxes), ("attributes.json", attributes)):
    with open(os.path.join(out, name), "w") as f:
      json.dump(data, f, indent=0, sort_keys=True)
  return out


def raw_tree(out: str, name: str = "synthetic", per_class: Sequence[int] = (40, 8, 8),
             size: int = 64, seed: int = 0, root: str = "") -> str:
  """The split tree a conversion of the synthetic set into `out` reads: `root`, or beside the
  shards (OUT/raw) when `out` is local, in the host's cache when it is a bucket; generated
  there once."""
  root = root or (os.path.join(storage.cache_dir(), "synthetic", name)
                  if storage.is_remote(out) else os.path.join(out, "raw"))
  if not os.path.exists(os.path.join(root, "boxes.json")):
    generate(root, per_class, size, seed)
  return root


def build_dataset(out: str, per_class: Sequence[int] = (40, 8, 8), size: int = 64, *,
                  name: str = "synthetic", seed: int = 0, shard_size: int = 1024,
                  tfds_metadata: bool = True):
  """Generates and converts the synthetic set into `out` (the demo's data); returns (info,
  report) after verifying what was written."""
  root = raw_tree(out, name, per_class, size, seed)
  plan = sources.split_tree(root, name, sources.SPLITS)
  sources.apply_side_files(plan, *(convert.read_side_file(os.path.join(root, f), f)
                                   for f in ("boxes.json", "attributes.json")))
  info, report = convert.convert(plan, out, shard_size=shard_size, progress=False,
                                 tfds_metadata=tfds_metadata)
  check = verify.verify(out)
  if not check.ok:
    raise RuntimeError(f"the synthetic data in {out} failed its verification:\n"
                       f"{check.summary()}")
  return info, report

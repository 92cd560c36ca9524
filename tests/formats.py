"""Fixture writers for the files real datasets contain, each written from the format's public
description (named beside it), so the tests meet what a user's folders hold rather than what
our own converter would produce."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image


def _save(path: str, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def gradient(size=(48, 32), seed=0) -> np.ndarray:
  """A smooth RGB test picture (uint8 HxWx3): JPEG keeps it close, so decoders can be
  compared."""
  w, h = size
  y, x = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(seed)
  base = rng.integers(20, 200, 3)
  img = np.stack([base[0] + x * 2, base[1] + y * 2, base[2] + (x + y)], -1)
  return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, mode: str = "RGB", progressive: bool = False,
         exif_orientation: int = 0) -> bytes:
  """JPEG (ITU-T T.81 / JFIF 1.02). mode "L": one component (grayscale); mode "CMYK": four
  components with Adobe's APP14 marker (Adobe Technical Note 5116), as Photoshop saves;
  `progressive`: T.81 Annex G spectral selection; `exif_orientation`: an APP1 EXIF block with
  tag 0x0112 (EXIF 2.32, CIPA DC-008: 6 = rotate 90 degrees clockwise to display)."""
  img = Image.fromarray(pixels).convert(mode)
  out = io.BytesIO()
  kwargs = {"quality": 95, "progressive": progressive}
  if exif_orientation:
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    kwargs["exif"] = exif.tobytes()
  img.save(out, "JPEG", **kwargs)
  return out.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
  return struct.pack(">I", len(body)) + kind + body + struct.pack(
      ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png16(values: np.ndarray) -> bytes:
  """A 16-bit PNG written from the PNG specification (W3C, 2nd ed., sections 5, 11.2.2 IHDR,
  9 filtering): signature, IHDR with bit depth 16 and colour type 0 (grey, HxW values) or 2
  (RGB, HxWx3 values), one IDAT of zlib-compressed scanlines with filter type 0, IEND. Samples
  are big-endian."""
  values = np.asarray(values, np.uint16)
  h, w = values.shape[:2]
  colour = 2 if values.ndim == 3 else 0
  rows = values.reshape(h, -1).astype(">u2").tobytes()
  stride = len(rows) // h
  raw = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(h))
  ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) +
          _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def png(pixels: np.ndarray, mode: str = "RGB") -> bytes:
  """An 8-bit PNG (mode RGB, RGBA, L or P: palette, colour type 3)."""
  img = Image.fromarray(pixels)
  img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.ADAPTIVE)
  out = io.BytesIO()
  img.save(out, "PNG")
  return out.getvalue()


def gif(frames: Sequence[np.ndarray]) -> bytes:
  """A GIF89a (CompuServe, 1990): palette images; several frames make an animation."""
  imgs = [Image.fromarray(f).convert("P", palette=Image.ADAPTIVE) for f in frames]
  out = io.BytesIO()
  imgs[0].save(out, "GIF", save_all=len(imgs) > 1, append_images=imgs[1:], duration=100)
  return out.getvalue()


def other(pixels: np.ndarray, fmt: str) -> bytes:
  """BMP (Windows bitmap v3) or WebP (RFC 9649), through PIL's writers."""
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
  return out.getvalue()


def gray16_values(seed: int = 0) -> np.ndarray:
  """A 16-bit grey ramp (32x48) whose low byte varies too."""
  return np.tile(np.linspace(seed * 300, 65535, 48), (32, 1)).astype(np.uint16)


def real_world_class_folder(folder: str, seed: int = 0) -> Dict[str, str]:
  """A class folder as downloads and photo collections leave them: {file name: what it is}.
  Every file that is an image is one that should convert."""
  pix = gradient(seed=seed)
  files = {
      "baseline.jpg": jpeg(pix),
      "gray.jpg": jpeg(pix, "L"),
      "cmyk.jpg": jpeg(pix, "CMYK"),
      "progressive.jpeg": jpeg(pix, progressive=True),
      "png inside.jpg": png(pix),                      # PNG bytes under a .jpg name
      "palette.png": png(pix, "P"),
      "alpha.png": png(pix, "RGBA"),
      "anim.gif": gif([pix, 255 - pix]),
      "deep16.png": png16(pix.astype(np.uint16) * 257),
      "gray16.png": png16(gray16_values(seed)),
      "rotated.jpg": jpeg(pix, exif_orientation=6),
      "UPPER.JPG": jpeg(pix[::-1]),
      "été photo 1.jpeg": jpeg(pix[:, ::-1]),           # spaces and non-ASCII in the name
      "写真.PNG": png(pix[::-1, ::-1]),
      "bitmap.bmp": other(pix, "BMP"),
      "lossless.webp": other(pix, "WEBP"),
  }
  for name, data in files.items():
    _save(os.path.join(folder, name), data)
  return {name: "image" for name in files}


def clutter(folder: str) -> List[str]:
  """What an OS and a person leave beside images: Finder's .DS_Store and an AppleDouble
  '._' file (macOS), Explorer's Thumbs.db (Windows), and a notes file."""
  _save(os.path.join(folder, ".DS_Store"), b"\x00\x00\x00\x01Bud1" + b"\x00" * 32)
  _save(os.path.join(folder, "._baseline.jpg"), b"\x00\x05\x16\x07" + b"\x00" * 20)
  _save(os.path.join(folder, "Thumbs.db"), b"\xd0\xcf\x11\xe0" + b"\x00" * 60)
  _save(os.path.join(folder, "notes.txt"), b"scraped from flickr\n")
  return ["notes.txt"]


def broken(folder: str) -> Dict[str, str]:
  """Files with an image name that are not images: {name: the reason's first words}."""
  good = jpeg(gradient())
  _save(os.path.join(folder, "empty.jpg"), b"")
  _save(os.path.join(folder, "half.jpg"), good[:len(good) // 2])
  _save(os.path.join(folder, "page.jpg"), b"<html><body>404 Not Found</body></html>")
  return {"empty.jpg": "empty file", "half.jpg": "truncated image",
          "page.jpg": "not an image"}


# --- EmoSet-118K, as the dataset publishes it -------------------------------------------------


def emoset(root: str, items: Sequence[Tuple[str, str, Dict]], seed: int = 0) -> None:
  """EmoSet-118K's layout, as its official loader reads it: `<root>/info.json`,
  `<root>/{train,val,test}.json` holding [emotion, image_id, image_path, annotation_path]
  entries with paths relative to root (image/<emotion>/<id>.jpg, annotation/<emotion>/<id>.json),
  and one annotation JSON per image carrying emotion, image_id and whichever attributes were
  labelled (brightness and colorfulness as numbers, scene, object as a list,
  facial_expression, human_action; absent when not labelled). `items`: (split, emotion,
  attributes)."""
  lists: Dict[str, List] = {"train": [], "val": [], "test": []}
  counters: Dict[str, int] = {}
  for split, emotion, attrs in items:
    n = counters[emotion] = counters.get(emotion, -1) + 1
    image_id = f"{emotion}_{n:05d}"
    image_path = f"image/{emotion}/{image_id}.jpg"
    ann_path = f"annotation/{emotion}/{image_id}.json"
    _save(os.path.join(root, image_path), jpeg(gradient(seed=seed + len(counters) * 10 + n)))
    _save(os.path.join(root, ann_path),
          json.dumps({"emotion": emotion, "image_id": image_id, **attrs}).encode())
    lists[split].append([emotion, image_id, image_path, ann_path])
  for split, entries in lists.items():
    _save(os.path.join(root, f"{split}.json"), json.dumps(entries).encode())
  # The class map in EmoSet's index order (docs/method.md §5: positive emotions first).
  _save(os.path.join(root, "info.json"), json.dumps({"emotion": {"label2idx": {
      e: i for i, e in enumerate(("amusement", "awe", "contentment", "excitement", "anger",
                                  "disgust", "fear", "sadness"))}}}).encode())


# --- EMOTIC, as MATLAB writes Annotations.mat ----------------------------------------------


def emotic_mat(path: str, splits: Dict[str, List[Tuple[str, str, List]]]) -> None:
  """EMOTIC's Annotations/Annotations.mat (Kosti et al., the dataset's own MATLAB struct
  layout, read the way its official loader does with scipy.io.loadmat): one 1xN struct array
  per split (train, val, test) of images with filename, folder, image_size (n_col, n_row),
  original_database (name, info) and person, a 1xP struct array with body_bbox [x1 y1 x2 y2],
  gender, age, annotations_categories (train: one struct whose `categories` is a cell of
  names; val/test: one struct per annotator), annotations_continuous and, in val and test,
  combined_categories (the annotators' union) and combined_continuous. `splits`: {split:
  [(folder, filename, persons)]}, persons [(box, categories or, for val/test, a list of
  annotators' category lists)]."""
  from scipy import io as sio

  def cell(names):
    arr = np.empty((1, len(names)), dtype=object)
    for i, n in enumerate(names):
      arr[0, i] = n
    return arr

  def struct(fields, rows):
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, row in enumerate(rows):
      for f in fields:
        arr[0, j][f] = row[f]
    return arr

  out = {}
  for split, image_rows in splits.items():
    images = []
    for folder, filename, persons in image_rows:
      people = []
      for box, cats in persons:
        vad = struct(["valence", "arousal", "dominance"],
                     [{"valence": 5, "arousal": 5, "dominance": 5}])
        person = {"body_bbox": np.asarray([box], np.float64), "gender": "Male",
                  "age": "Adult", "annotations_continuous": vad}
        if split == "train":
          person["annotations_categories"] = struct(["categories"], [{"categories": cell(cats)}])
        else:
          person["annotations_categories"] = struct(
              ["categories"], [{"categories": cell(a)} for a in cats])
          union = sorted({c for a in cats for c in a})
          person["combined_categories"] = cell(union)
          person["combined_continuous"] = vad
        people.append(person)
      fields = ["body_bbox", "gender", "age", "annotations_categories",
                "annotations_continuous"] + (["combined_categories", "combined_continuous"]
                                             if split != "train" else [])
      images.append({
          "filename": filename, "folder": folder,
          "image_size": struct(["n_col", "n_row"], [{"n_col": 100, "n_row": 50}]),
          "original_database": struct(["name", "info"], [{"name": "mscoco", "info": 0}]),
          "person": struct(fields, people)})
    out[split] = struct(["filename", "folder", "image_size", "original_database", "person"],
                        images)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sio.savemat(path, out)


def darknet_weights(path: str, params: Dict[str, Dict[str, np.ndarray]],
                    cfg: Sequence[Dict[str, str]], version=(0, 2, 0), seen: int = 0) -> str:
  """A Darknet .weights file as darknet's save_weights (src/parser.c) writes it: int32 major,
  minor, revision; `seen` as int64 from version 0.2 on, int32 before; then every
  [convolutional] layer of the cfg in order: with batch_normalize its biases, scales, rolling
  means and rolling variances, else its biases; then its kernel, filters x channels x size x
  size. `params`: {"conv_<cfg layer index>": those arrays, the kernel as [size, size,
  channels, filters]}."""
  major, minor, _ = version
  parts = [np.asarray(version, "<i4").tobytes(),
           np.asarray([seen], "<i8" if major * 10 + minor >= 2 else "<i4").tobytes()]
  for i, layer in enumerate(cfg[1:]):
    if layer["type"] == "convolutional":
      conv = params[f"conv_{i}"]
      names = (("bn_bias", "bn_scale", "bn_mean", "bn_var")
               if int(layer.get("batch_normalize", 0)) else ("bias",))
      parts += [np.asarray(conv[n], "<f4").tobytes() for n in names]
      parts.append(np.ascontiguousarray(np.asarray(conv["kernel"], "<f4").transpose(3, 2, 0, 1)
                                        ).tobytes())
  return _save(path, b"".join(parts))

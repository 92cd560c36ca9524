"""What the converter stores for one source image, and why a file was skipped, in words.

Every stored image must decode to the same 3-channel 8-bit RGB pixels through our reader
(PIL, `transforms.decode`) and through TensorFlow (`tf.io.decode_image(channels=3)`, what
TFDS's Image feature runs). A file's own bytes are kept when both readers agree on it:

  JPEG, 8-bit RGB or grayscale (baseline or progressive)
  PNG, 8-bit RGB or grayscale

Anything else is decoded once here and stored re-encoded as RGB: a JPEG source (CMYK, which
TensorFlow's decoder refuses) as JPEG at quality 95, any other source (GIF: its first frame;
16-bit PNG: scaled to 8 bits, where PIL's own conversion would clip it to white; palette,
alpha, BMP, WebP) as lossless PNG. A file is recognized by its content, not its name (PNG
bytes under a `.jpg` name are a PNG).

EXIF orientation (`exif_orientation`): "ignore" (the default) stores the pixels as encoded,
as the reference implementation and TensorFlow read them; "apply" rotates or mirrors the image
as its EXIF tag says (the way a photo viewer shows it) and re-encodes it.
"""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION_MODES = ("ignore", "apply")
JPEG_QUALITY = 95
_KEPT = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}
_EXIF_ORIENTATION_TAG = 0x0112
# Files a file manager or an OS leaves in folders; skipped and counted, never converted.
SYSTEM_FILES = (".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db")


class SkippedFile(ValueError):
  """A source file that is not converted; the message is the reason in words."""


def is_system_file(name: str) -> bool:
  return name.lower() in SYSTEM_FILES or name.startswith("._")   # ._*: macOS resource forks


@dataclasses.dataclass
class Stored:
  data: bytes            # what goes into the record
  source_size: tuple     # (width, height) of the file's pixels as encoded
  orientation: int = 1   # the EXIF orientation applied (1: none)
  reencoded: str = ""    # why the bytes are not the file's own ("" when they are)

  def relative_box(self, box_xyxy):
    """A person box in the file's pixels [x1, y1, x2, y2] -> relative [ymin, xmin, ymax,
    xmax] in the stored image (rotated with it), clipped; None if empty."""
    width, height = self.source_size
    x1, y1, x2, y2 = box_xyxy
    rel = np.clip([y1 / height, x1 / width, y2 / height, x2 / width], 0.0, 1.0)
    if rel[2] <= rel[0] or rel[3] <= rel[1]:
      return None
    return [float(v) for v in orient_box(rel, self.orientation)]


def orient_box(rel_box, orientation: int):
  """A relative [ymin, xmin, ymax, xmax] box moved as `ImageOps.exif_transpose` moves the
  pixels for an EXIF orientation (1-8, EXIF 2.32 tag 0x0112)."""
  y0, x0, y1, x1 = rel_box
  return {
      1: (y0, x0, y1, x1),
      2: (y0, 1 - x1, y1, 1 - x0),              # mirrored left-right
      3: (1 - y1, 1 - x1, 1 - y0, 1 - x0),      # rotated 180
      4: (1 - y1, x0, 1 - y0, x1),              # mirrored top-bottom
      5: (x0, y0, x1, y1),                      # transposed
      6: (x0, 1 - y1, x1, 1 - y0),              # rotated 90 clockwise to display
      7: (1 - x1, 1 - y1, 1 - x0, 1 - y0),      # transversed
      8: (1 - x1, y0, 1 - x0, y1),              # rotated 90 counter-clockwise
  }.get(orientation, (y0, x0, y1, x1))


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    # 16-bit (PIL opens 16-bit grayscale PNGs as I;16 or I): scale to 8 bits, as
    # TensorFlow's uint16 -> uint8 conversion does (the high byte).
    wide = np.asarray(img).astype(np.int64)
    return Image.fromarray(np.clip(wide >> 8, 0, 255).astype(np.uint8), "L").convert("RGB")
  if img.mode == "F":
    values = np.asarray(img, np.float64)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
  return img.convert("RGB") if img.mode != "RGB" else img


def _png_bit_depth(data: bytes) -> int:
  """The bit depth in a PNG's IHDR (PNG spec 11.2.2: byte 24 of the file). PIL opens 16-bit
  RGB as 8-bit "RGB", so its mode alone does not tell."""
  return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _orientation(img: Image.Image) -> int:
  try:
    return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
  except Exception:  # pylint: disable=broad-except
    return 1       # an unreadable EXIF block: nothing to apply


def _encode(img: Image.Image, fmt: str) -> bytes:
  out = io.BytesIO()
  img.save(out, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
  return out.getvalue()


def prepare(data: bytes, max_size: int = 0, exif_orientation: str = "ignore") -> Stored:
  """The bytes to store for one file's contents; raises `SkippedFile` with the reason."""
  if exif_orientation not in EXIF_ORIENTATION_MODES:
    raise ValueError(f"--exif_orientation {exif_orientation!r}: choose one of "
                     f"{EXIF_ORIENTATION_MODES}")
  if not data:
    raise SkippedFile("empty file (0 bytes)")
  try:
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()     # decodes fully: a truncated or corrupt file fails here, not in training
  except UnidentifiedImageError:
    raise SkippedFile("not an image (no image format recognized in its bytes)") from None
  except Exception as e:  # pylint: disable=broad-except
    raise SkippedFile(reason(e)) from None
  reasons, source_size, orientation = [], img.size, 1
  if (fmt, img.mode) not in _KEPT:
    reasons.append(f"{fmt} {img.mode}")
  elif fmt == "PNG" and _png_bit_depth(data) != 8:
    reasons.append(f"PNG {img.mode} {_png_bit_depth(data)}-bit")
  if exif_orientation == "apply" and _orientation(img) != 1:
    orientation = _orientation(img)
    img = ImageOps.exif_transpose(img)
    reasons.append("EXIF orientation applied")
  rgb = _to_rgb(img)
  width, height = rgb.size
  resized = bool(max_size) and min(width, height) > max_size
  if resized:
    scale = max_size / min(width, height)
    rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                     Image.BICUBIC)
    reasons.append(f"shorter side above --max_size {max_size}")
  if not reasons:
    return Stored(data, source_size)
  out_fmt = "JPEG" if fmt == "JPEG" or resized else "PNG"
  return Stored(_encode(rgb, out_fmt), source_size, orientation,
                f"{'; '.join(reasons)} -> {out_fmt} RGB")


_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def reason(err: BaseException) -> str:
  """An exception met while reading an image, as a reason in words (no object addresses)."""
  if isinstance(err, SkippedFile):
    return str(err)
  text = _ADDRESS.sub("", str(err)).strip().rstrip(":")
  if isinstance(err, Image.DecompressionBombError):
    return f"image too large to decode safely ({text})"
  if "truncated" in text.lower() or "premature end" in text.lower():
    return "truncated image (the file ends before the image data does)"
  if isinstance(err, FileNotFoundError):
    # An OS error names no more than "not found"; a reader's own (errno unset) says where.
    return "file not found" if err.errno is not None or not text else text
  if isinstance(err, PermissionError):
    return "permission denied"
  return f"corrupt image data ({type(err).__name__}: {text})" if text else \
      f"corrupt image data ({type(err).__name__})"

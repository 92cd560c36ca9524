"""The per-image text prompt of docs/method.md §2, built from EmoSet-style attributes.

Pure Python (no JAX, no TensorFlow): the conversion tool stores each record's prompt (and,
with a text embedder, its embedding); the teacher embeds what the data carries.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

# Attribute keys, as the conversion tool stores them in each record.
ATTRIBUTES = ("scene", "objects", "brightness", "colorfulness", "facial_expression",
              "human_action")


def _present(value: Any) -> bool:
  if value is None:
    return False
  if isinstance(value, str):
    return bool(value.strip())
  if isinstance(value, (list, tuple)):
    return any(_present(v) for v in value)
  return True


def _fmt(value: Any) -> str:
  """A value as the reference writes it, `str(value)`: EmoSet's brightness 0.0 is "0.0" and 1.0
  is "1.0", the way the dataset labels them."""
  return str(value).strip()


def join_names(names: Sequence[Any]) -> str:
  """["a"] -> "a"; ["a", "b"] -> "a and b"; ["a", "b", "c"] -> "a, b and c"."""
  names = [_fmt(n) for n in names if _present(n)]
  if len(names) <= 1:
    return "".join(names)
  return ", ".join(names[:-1]) + " and " + names[-1]


def build_prompt(emotion: str, attributes: Optional[Mapping[str, Any]] = None) -> str:
  """The sentences for the attributes that are present, then the always-present emotion one,
  joined by spaces. `attributes` uses the keys of `ATTRIBUTES`; missing or empty ones are
  skipped; `objects` may be a string or a list of names."""
  if not _present(emotion):
    raise ValueError("build_prompt needs an emotion name")
  attrs = dict(attributes or {})
  unknown = set(attrs) - set(ATTRIBUTES)
  if unknown:
    raise ValueError(f"unknown prompt attributes {sorted(unknown)}; known: {ATTRIBUTES}")
  get = lambda k: attrs.get(k) if _present(attrs.get(k)) else None  # noqa: E731
  parts = []
  if get("scene"):
    parts.append(f"The scene type of this photo is {_fmt(attrs['scene'])}.")
  objects = get("objects")
  if objects:
    names = [objects] if isinstance(objects, str) else list(objects)
    parts.append(f"The main subjects are {join_names(names)}.")
  bright, color = get("brightness"), get("colorfulness")
  if bright is not None and color is not None:
    parts.append(f"The image has a brightness of {_fmt(bright)} and color saturation of "
                 f"{_fmt(color)}.")
  elif bright is not None:
    parts.append(f"The image has a brightness of {_fmt(bright)}.")
  elif color is not None:
    parts.append(f"The image has color saturation of {_fmt(color)}.")
  if get("facial_expression"):
    parts.append(f"Human facial expression is {_fmt(attrs['facial_expression'])}.")
  if get("human_action"):
    parts.append(f"The action being performed is {_fmt(attrs['human_action'])}.")
  parts.append(f"The overall emotion conveyed is {_fmt(emotion)}.")
  return " ".join(parts)

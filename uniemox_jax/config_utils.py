"""Helpers for the `configs/*.py` files: the `:key=value,...` variant string."""
from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "vit=L/16,mask=0.9" into a ConfigDict over `defaults`, casting each value to the
  type of its default. An unknown key or a value of the wrong type fails with a message that
  names it."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"config variant {item!r} is not key=value (in {arg!r})")
    if key not in defaults:
      raise ValueError(f"unknown config variant key {key!r} in {arg!r}; known: "
                       f"{sorted(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = kind(value)
    except ValueError:
      raise ValueError(f"config variant {key}={value!r} is not a {kind.__name__}") from None
  return out

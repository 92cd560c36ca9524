"""Helpers for the `configs/*.py` files: the `:key=value,...` variant string, and configs
that build on each other wherever the command runs."""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import ml_collections

# The repository's configs/ folder (beside this package in a source checkout).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


def sibling(config_file: str, name: str):
  """The config module `name` from the folder of `config_file` (a config's own `__file__`),
  loaded by its path: a config given as --config /any/path/configs/demo.py finds the configs
  it builds on without that folder's parent being on sys.path or the current directory."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  key = "_uniemox_config:" + path
  if key not in sys.modules:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{config_file} builds on {path}, which does not exist")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


def repository_config(name: str):
  """configs/<name>.py of the repository this package runs from (the demo's configs)."""
  if not os.path.isdir(CONFIGS_DIR):
    raise FileNotFoundError(f"{CONFIGS_DIR} does not exist: run this command from a source "
                            "checkout (`pip install -e .`)")
  return sibling(os.path.join(CONFIGS_DIR, "__init__.py"), name)


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

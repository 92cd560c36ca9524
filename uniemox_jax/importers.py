"""Encoder importers: `config.init.encoder_format` -> how `config.init.encoder` is read.

Each importer maps (path, the encoder params of the model being initialized, as a template) to
encoder params in this codebase's layout (host arrays; a final `norm` may be present and is
dropped by classifiers). Registered here: `uniemox_jax` (a checkpoint written here, or by the
PyTorch import) and `torch_mae`, `torch_vit`, `torch_uniemox_pretrain`,
`torch_uniemox_finetune` (.pth files, through uniemox_jax/torch_import.py). Training and
evaluation both read encoders through this module; it imports neither.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from absl import logging

from uniemox_jax import checkpointing
from uniemox_jax import torch_import

# format name -> importer.
ENCODER_IMPORTERS: Dict[str, Callable[[str, Any], Any]] = {}


def register_encoder_importer(name: str, fn: Callable[[str, Any], Any]) -> None:
  ENCODER_IMPORTERS[name] = fn


def _import_uniemox_jax(path: str, template: Any) -> Any:
  """The encoder of a checkpoint written here (pretraining or fine-tuning): `<dir>/<step>`
  or `<dir>` for its latest step."""
  del template
  return checkpointing.Checkpoint.open(path, "config.init.encoder").read(("params", "encoder"))


register_encoder_importer("uniemox_jax", _import_uniemox_jax)


# PyTorch files (MAE, timm / fine-tuned ViTs, the authors' UniEmoX), read with the optional
# torch extra: see uniemox_jax/torch_import.py.
for _kind in ("mae", "vit", "uniemox_pretrain", "uniemox_finetune"):
  register_encoder_importer(f"torch_{_kind}", torch_import.encoder_importer(_kind))


def import_encoder(config, template: Any) -> Any:
  """The encoder that config.init.encoder / encoder_format name, as host arrays."""
  cfg = config.init
  if cfg.encoder_format not in ENCODER_IMPORTERS:
    raise ValueError(f"config.init.encoder_format={cfg.encoder_format!r}: known formats "
                     f"are {sorted(ENCODER_IMPORTERS)}")
  encoder = ENCODER_IMPORTERS[cfg.encoder_format](cfg.encoder, template)
  logging.info("Encoder read from %s (%s)", cfg.encoder, cfg.encoder_format)
  return encoder

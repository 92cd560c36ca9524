"""Models, built from `config.model` in one place."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uniemox_jax import errors
from uniemox_jax.models import attention as attention_lib
from uniemox_jax.models import fusion
from uniemox_jax.models import masking
from uniemox_jax.models import vit
from uniemox_jax.models.classifier import Classifier
from uniemox_jax.models import uniemox as uniemox_lib
from uniemox_jax.models.uniemox import UniEmoX

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str, field: str = "config.model.dtype") -> Any:
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f"{field}={name!r}: choose one of {sorted(_DTYPES)}") from None


def _common(cfg) -> dict:
  attention_lib.check_implementation(cfg.get("attention", "auto"))
  if cfg.get("attention_pad", 0) < 0:
    raise ValueError(f"config.model.attention_pad={cfg.attention_pad}: must be >= 0 "
                     "(0: the kernel's default)")
  return dict(variant=cfg.variant, image_size=cfg.image_size, drop_path=cfg.drop_path,
              remat=cfg.remat, scan=cfg.scan, dtype=dtype(cfg.dtype),
              param_dtype=dtype(cfg.param_dtype, "config.model.param_dtype"),
              attention=cfg.get("attention", "auto"),
              attention_pad=cfg.get("attention_pad", 0))


def pretrain_model(cfg) -> UniEmoX:
  """UniEmoX from `config.model` (see configs/pretrain.py for the fields). Every model field
  is checked here, before anything is loaded or compiled (the loss fields are checked by
  `uniemox_jax.objective.from_config`)."""
  shape = vit.decode_variant(cfg.variant)
  masking.num_kept(vit.grid_size(cfg.image_size, shape.patch) ** 2, cfg.mask_ratio)
  fusion.get_fusion(cfg.fusion)
  uniemox_lib.remat_policies(cfg.remat)
  return UniEmoX(mask_ratio=cfg.mask_ratio, decoder_width=cfg.decoder.width,
                 decoder_depth=cfg.decoder.depth, decoder_heads=cfg.decoder.heads,
                 fusion=cfg.fusion, fusion_heads=cfg.fusion_heads,
                 norm_pix_loss=cfg.norm_pix_loss,
                 **_common(cfg))


def classification_model(cfg, num_classes: int) -> Classifier:
  """The downstream classifier over the same encoder fields of `config.model`."""
  vit.grid_size(cfg.image_size, vit.decode_variant(cfg.variant).patch)
  try:
    vit.block_remat(cfg.remat)
  except ValueError as e:
    raise ValueError(f"config.model.remat: {e}") from None
  return Classifier(num_classes=num_classes, pos_embed=cfg.get("pos_embed", "sincos"),
                    pool=cfg.get("pool", "avg"), **_common(cfg))


def check_params(tree: Any, template: Any, what: str) -> None:
  """Raises a ValueError naming every array of `tree` that is missing from, extra to or
  shaped differently than `template` (a model's parameters)."""
  got = traverse_util.flatten_dict(dict(tree), sep="/")
  want = traverse_util.flatten_dict(dict(template), sep="/")
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: shape {np.shape(got[k])} != model's {np.shape(want[k])}"
               for k in sorted(set(got) & set(want)) if np.shape(got[k]) != np.shape(want[k])]
  if problems:
    raise errors.UserError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))

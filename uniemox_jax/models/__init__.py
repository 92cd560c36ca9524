"""Models, built from `config.model` in one place."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uniemox_jax import errors
from uniemox_jax import losses
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


def l1_group_size(value: Any, micro_batch: int = 0, devices: int = 1) -> int:
  """config.model.l1_group -> rows per L1 group (0: the whole batch).

    global   every row of a (micro-)batch against every other: the method as written
    device   the rows of one device, micro_batch / devices: the reference's per-GPU L1
    N        groups of N rows; N must divide the micro-batch

  A micro-batch of gradient accumulation holds the same rows of every device's shard, device
  by device (`trainer.TrainLoop._gradients`), so "device" and N mean the same groups with or
  without accumulation. Without `micro_batch` (config checks) only the value is checked."""
  text = str(value).strip()
  if text == "global":
    return 0
  if text == "device":
    if micro_batch and micro_batch % devices:
      raise ValueError(f"config.model.l1_group=device: {micro_batch} rows per micro-batch do "
                       f"not divide over {devices} devices")
    return micro_batch // devices if micro_batch else 0
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f"config.model.l1_group={value!r}: choose global, device or a positive "
                     "number of rows")
  if micro_batch and micro_batch % int(text):
    raise ValueError(f"config.model.l1_group={text}: groups of {text} rows do not divide the "
                     f"{micro_batch} rows of a micro-batch")
  return int(text)


def pretrain_model(cfg, l1_group_rows: int = 0) -> UniEmoX:
  """UniEmoX from `config.model` (see configs/pretrain.py for the fields). Every field is
  checked here, before anything is loaded or compiled. `l1_group_rows`: `l1_group_size`
  resolved for the run's batch."""
  l1_group_size(cfg.get("l1_group", "global"))
  weights = dict(cfg.loss_weights)
  shape = vit.decode_variant(cfg.variant)
  masking.num_kept(vit.grid_size(cfg.image_size, shape.patch) ** 2, cfg.mask_ratio)
  fusion.get_fusion(cfg.fusion)
  uniemox_lib.remat_policies(cfg.remat)
  losses.total_loss({}, {k: 0.0 for k in weights})  # rejects unknown term names
  return UniEmoX(mask_ratio=cfg.mask_ratio, decoder_width=cfg.decoder.width,
                 decoder_depth=cfg.decoder.depth, decoder_heads=cfg.decoder.heads,
                 fusion=cfg.fusion, fusion_heads=cfg.fusion_heads,
                 norm_pix_loss=cfg.norm_pix_loss, l1_group_size=l1_group_rows,
                 loss_weights=tuple(sorted((k, float(v)) for k, v in weights.items())),
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

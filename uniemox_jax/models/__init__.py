"""Models, built from `config.model` in one place."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniemox_jax.models import attention as attention_lib
from uniemox_jax.models import fusion
from uniemox_jax.models import hf_backbone
from uniemox_jax.models import masking
from uniemox_jax.models import surgery
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


def student_config(cfg) -> vit.StudentConfig:
  """The student's compute fields of `config.model`, checked (before anything loads)."""
  attention_lib.check_implementation(cfg.attention)
  if cfg.attention_pad < 0:
    raise ValueError(f"config.model.attention_pad={cfg.attention_pad}: must be >= 0 "
                     "(0: the kernel's default)")
  return vit.StudentConfig(drop_path=cfg.drop_path, remat=cfg.remat, scan=cfg.scan,
                           dtype=dtype(cfg.dtype),
                           param_dtype=dtype(cfg.param_dtype, "config.model.param_dtype"),
                           attention=cfg.attention, attention_pad=cfg.attention_pad)


def pretrain_model(cfg) -> UniEmoX:
  """UniEmoX from `config.model` (see configs/pretrain.py for the fields). Every model field
  is checked here, before anything is loaded or compiled (the loss fields are checked by
  `uniemox_jax.objective.from_config`)."""
  shape = vit.decode_variant(cfg.variant)
  masking.num_kept(vit.grid_size(cfg.image_size, shape.patch) ** 2, cfg.mask_ratio)
  fusion.get_fusion(cfg.fusion)
  uniemox_lib.remat_policies(cfg.remat)
  return UniEmoX(variant=cfg.variant, image_size=cfg.image_size, mask_ratio=cfg.mask_ratio,
                 decoder_width=cfg.decoder.width, decoder_depth=cfg.decoder.depth,
                 decoder_heads=cfg.decoder.heads, fusion=cfg.fusion,
                 fusion_heads=cfg.fusion_heads, norm_pix_loss=cfg.norm_pix_loss,
                 student=student_config(cfg))


def classification_model(cfg, num_classes: int) -> Any:
  """The downstream classifier over the same encoder fields of `config.model`: our ViT
  (`Classifier`), or with config.model.backbone a transformers backbone
  (`hf_backbone.BackboneClassifier`)."""
  if cfg.get("backbone"):
    spec = hf_backbone.backbone_spec(cfg.backbone)
    if spec.image_size and spec.image_size != cfg.image_size:
      raise ValueError(f"config.model.image_size={cfg.image_size}, but the backbone "
                       f"{cfg.backbone!r} ({spec.family}) takes {spec.image_size} px images")
    return hf_backbone.BackboneClassifier(num_classes, cfg.backbone, cfg.image_size,
                                          dtype(cfg.dtype))
  vit.grid_size(cfg.image_size, vit.decode_variant(cfg.variant).patch)
  try:
    vit.block_remat(cfg.remat)
  except ValueError as e:
    raise ValueError(f"config.model.remat: {e}") from None
  return Classifier(num_classes=num_classes, variant=cfg.variant, image_size=cfg.image_size,
                    pos_embed=cfg.pos_embed, pool=cfg.pool, student=student_config(cfg))


def encoder_template(cfg) -> Any:
  """The parameter tree (shapes and dtypes) of an encoder of `config.model` with its final
  norm: what an importer reads an encoder into when no model holds one yet (the linear
  probe)."""
  student = student_config(cfg)
  encoder = vit.Encoder(cfg.variant, cfg.image_size, pos_embed=cfg.pos_embed,
                        student=vit.StudentConfig(dtype=student.dtype,
                                                  param_dtype=student.param_dtype))
  size = cfg.image_size
  abstract = jax.eval_shape(encoder.init, jax.random.key(0),
                            jnp.zeros((1, size, size, 3), jnp.float32))["params"]
  return nn.unbox(abstract)


def check_params(tree: Any, template: Any, what: str) -> Any:
  """`tree` in `template`'s layout (blocks stacked or unstacked, dtypes cast); raises a user
  error naming every array of `tree` that is missing from, extra to or shaped differently
  than `template` (a model's parameters)."""
  fitted, report = surgery.fit(tree, template)
  report.check(what)
  return fitted

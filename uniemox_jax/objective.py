"""The UniEmoX pretraining objective: frozen teacher outputs, then the student model.

`pretrain_losses` is the single pure function a training step differentiates (with respect to
`params` only). The teacher's outputs are computed from `teacher_params` under
`stop_gradient`, so its parameters never receive a gradient.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax

from uniemox_jax.models.uniemox import UniEmoX
from uniemox_jax.teacher.clip import ClipTeacher


def check_compatible(model: UniEmoX, teacher: ClipTeacher) -> None:
  """The student tokens live in CLIP's embedding space: their widths must agree."""
  if model.decoder_width != teacher.embed_dim:
    raise ValueError(
        f"config.model.decoder.width={model.decoder_width} must equal the CLIP teacher's "
        f"embedding width {teacher.embed_dim} (config.teacher.name); the student tokens are "
        "distilled into CLIP's space")


def teacher_outputs(teacher: ClipTeacher, teacher_params: Any,
                    batch: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
  """omega (image), lambda (text) and CLIP's logit scale for a batch.

  The text embedding is taken from the batch ("text_emb", computed once at conversion) when
  present, otherwise from the tokens ("input_ids", "attention_mask") through the text tower.
  """
  if "text_emb" in batch:
    text_emb = batch["text_emb"]
  elif "input_ids" in batch:
    text_emb = teacher.text_embed(teacher_params, batch["input_ids"],
                                  batch.get("attention_mask"))
  else:
    raise KeyError("a pretraining batch needs 'text_emb' or 'input_ids'; it has "
                   f"{sorted(batch)}")
  return {"image_emb": teacher.image_embed(teacher_params, batch["scene"]),
          "text_emb": jax.lax.stop_gradient(text_emb),
          "logit_scale": teacher.logit_scale(teacher_params)}


def pretrain_losses(model: UniEmoX, params: Any, teacher: ClipTeacher, teacher_params: Any,
                    batch: Mapping[str, jax.Array], key: jax.Array, *, train: bool = True,
                    ) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
  """(losses, aux) of `UniEmoX` on `batch` ("scene", "person" and the text, see
  `teacher_outputs`). `key` is split per purpose: patch masks and drop path."""
  mask_key, dropout_key = jax.random.split(key)
  t = teacher_outputs(teacher, teacher_params, batch)
  return model.apply({"params": params}, batch["scene"], batch["person"], t["text_emb"],
                     t["image_emb"], t["logit_scale"], train=train,
                     rngs={"mask": mask_key, "dropout": dropout_key})

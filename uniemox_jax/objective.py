"""The UniEmoX pretraining objective: the one place that composes L1, L2 and L3 and owns their
names.

The model (`uniemox_jax.models.uniemox.UniEmoX`) returns its outputs (student tokens, masks,
the reconstruction and its target); the frozen teacher's outputs (image embedding omega, text
embedding lambda, logit scale) are computed here under `stop_gradient`; `Objective` turns both
into the loss terms and their weighted total. `Objective.__call__` is the single pure function a
training step (and the step benchmark) differentiates, with respect to the student's `params`
only, so the teacher's parameters never receive a gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from uniemox_jax import losses
from uniemox_jax.models.uniemox import UniEmoX
from uniemox_jax.teacher.clip import ClipTeacher

LOSS_NAMES = ("l1", "l2", "l3")
TOTAL = "total"


def check_weights(weights: Mapping[str, float]) -> None:
  unknown = set(weights) - set(LOSS_NAMES)
  if unknown:
    raise ValueError(f"config.model.loss_weights has unknown terms {sorted(unknown)}; "
                     f"the terms are {LOSS_NAMES}")


def total_loss(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """Weighted sum of the enabled terms. A weight of 0 (or a missing term) switches it off."""
  check_weights(weights)
  total = jnp.zeros((), jnp.float32)
  for name in LOSS_NAMES:
    w = float(weights.get(name, 0.0))
    if w:
      total = total + w * terms[name]
  return total


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


@dataclasses.dataclass(frozen=True)
class Objective:
  """L1 (similarity distillation), L2 (embedding cosine), L3 (masked reconstruction) and
  "total", their weighted sum. `weights`: ((name, weight), ...), a weight of 0 keeps a term
  out of the total (L1 and L2 are cheap and always reported; L3 only runs, decoder included,
  when its weight is not 0). `l1_group_size`: rows per L1 group (0: the whole batch)."""
  weights: Tuple[Tuple[str, float], ...] = tuple((n, 1.0) for n in LOSS_NAMES)
  l1_group_size: int = 0

  def __post_init__(self):
    check_weights(dict(self.weights))

  @property
  def reconstructs(self) -> bool:
    return bool(dict(self.weights).get("l3", 0.0))

  def terms(self, outputs: Mapping[str, jax.Array],
            teacher: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """The loss terms of the model's `outputs` against the `teacher_outputs`."""
    gamma, omega = outputs["gamma"], teacher["image_emb"]
    terms = {
        "l1": losses.similarity_distillation_loss(gamma, omega, teacher["text_emb"],
                                                  teacher["logit_scale"], self.l1_group_size),
        "l2": losses.embedding_cosine_loss(gamma, omega),
    }
    if self.reconstructs:
      terms["l3"] = losses.masked_reconstruction_loss(outputs["prediction"], outputs["target"],
                                                      outputs["mask"])
    terms[TOTAL] = total_loss(terms, dict(self.weights))
    return terms

  def __call__(self, model: UniEmoX, params: Any, teacher: ClipTeacher, teacher_params: Any,
               batch: Mapping[str, jax.Array], key: jax.Array, *, train: bool = True,
               ) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
    """(terms, outputs) of `model` on `batch` ("scene", "person" and the text, see
    `teacher_outputs`). `key` is split per purpose: patch masks and drop path."""
    mask_key, dropout_key = jax.random.split(key)
    outputs = model.apply({"params": params}, batch["scene"], batch["person"], train=train,
                          decode=self.reconstructs,
                          rngs={"mask": mask_key, "dropout": dropout_key})
    return self.terms(outputs, teacher_outputs(teacher, teacher_params, batch)), outputs


def from_config(cfg, micro_batch: int = 0, devices: int = 1) -> Objective:
  """The objective of `config.model` (loss_weights, l1_group), checked; `micro_batch` and
  `devices` resolve l1_group for a run (without them only the values are checked)."""
  weights = dict(cfg.loss_weights)
  check_weights(weights)
  return Objective(weights=tuple(sorted((k, float(v)) for k, v in weights.items())),
                   l1_group_size=l1_group_size(cfg.l1_group, micro_batch,
                                               devices))

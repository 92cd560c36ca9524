"""Zero-shot emotion recognition with a pretrained UniEmoX: no training.

The fused student token gamma is distilled into CLIP's embedding space, so it can be compared
with CLIP text embeddings of the class names: each class's prompts (TEMPLATES) are embedded by
the teacher's text tower, normalized, averaged and normalized again; an image's scores are the
softmax of CLIP's logit scale times the cosine similarity of its gamma (from the eval-cropped
scene and its person view) with each class. The report is the classification report.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import models
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import reports
from uniemox_jax.models.uniemox import UniEmoX

TEMPLATES = (
    "The overall emotion conveyed is {}.",
    "A photo that conveys {}.",
    "An image evoking {}.",
    "A picture that makes people feel {}.",
)


def class_embeddings(teacher, class_names: Sequence[str],
                     templates: Sequence[str] = TEMPLATES) -> np.ndarray:
  """[C, D]: per class, the normalized mean of its normalized prompt embeddings."""
  prompts = [t.format(name.replace("_", " ")) for name in class_names for t in templates]
  emb = teacher.embed_texts(prompts).reshape(len(class_names), len(templates), -1)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  mean = emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


class ZeroShot(base.Evaluator):
  reads = base.PRETRAIN

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    model = models.pretrain_model(self.config.model)
    # The class prompts are embedded once, by the teacher the run distils from.
    text = jnp.asarray(class_embeddings(self.teacher, self.info.class_names))
    scale = self.teacher.logit_scale(self.teacher.params)
    multi = self.info.multi_label

    @jax.jit
    def scores(p, batch):
      gamma = model.apply({"params": p}, augment.normalize(batch["image"]),
                          augment.normalize(batch["person"]), method=UniEmoX.embed)["gamma"]
      gamma = gamma.astype(jnp.float32)
      gamma = gamma / jnp.linalg.norm(gamma, axis=-1, keepdims=True)
      logits = scale * gamma @ text.T
      return {"scores": jax.nn.sigmoid(logits) if multi else jax.nn.softmax(logits)}
    self.scores = gathering.EvalStep(scores, self.field)

  def compile_ahead(self, params) -> None:
    self.scores.compile_ahead(self.place(params), self.mesh, self.config.eval_batch_size,
                              self.config.model.image_size, keys=("image", "person"))

  def run(self, params) -> base.Result:
    dataset = input_pipeline.eval_dataset(
        self.data_dir, self.split, batch_size=self.batch_size,
        image_size=self.config.model.image_size, process_index=jax.process_index(),
        process_count=jax.process_count(), person_view=True)
    outputs = gathering.gather_split(functools.partial(self.scores, self.place(params)),
                                    dataset, self.mesh, keys=("image", "person"),
                                    progress=self.progress,
                                    description=f"zero-shot {self.split}")
    report = reports.report(outputs.pop("scores"), outputs, self.info)
    report.update(split=self.split, templates=list(TEMPLATES))
    return base.Result(base.float_scalars(report), report)

"""The `explain` evaluator: heatmaps of a fine-tuned classifier on fixed images.

The first `num` records of the split (eval crop) in a grid: the image, then the heatmap of
each of `methods` over it (`uniemox_jax.explanation`), each row labelled with the target
class ("predicted", or a class name given as `target`) and its probability. A training run
logs the grid to TensorBoard at its evaluation steps (the same images every time); the
evaluation command writes it as OUT/<folder>/explain_<split>.png.
"""
from __future__ import annotations

import jax
import numpy as np

from uniemox_jax import errors
from uniemox_jax import explanation
from uniemox_jax import models
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators import classification
from uniemox_jax.evaluators import reconstruction
from uniemox_jax.evaluators import reports
from uniemox_jax.models import surgery

PREDICTED = "predicted"


def target_index(target: str, class_names, where: str) -> int:
  """-1 for the predicted class, else the named class's index."""
  if target == PREDICTED:
    return -1
  if target not in class_names:
    raise errors.UserError(f"{where} {target!r}: not a class of this model (it has "
                           f"{', '.join(class_names)}; or '{PREDICTED}')")
  return list(class_names).index(target)


class Explain(base.Evaluator):
  reads = base.CLASSIFIER
  defaults = {"num": 4, "methods": ",".join(explanation.METHODS), "target": PREDICTED,
              "head_fusion": "mean", "discard_ratio": 0.0}

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.methods = explanation.check_methods(str(self.spec["methods"]).split(","),
                                             f"{self.field}.methods")
    names = self.info.class_names
    self.target = target_index(str(self.spec["target"]), names, f"{self.field}.target")
    self.model = explanation.unrolled(models.classification_model(self.config.model,
                                                                  len(names)))
    self.images = reconstruction.fixed_images(self.data_dir, self.split, int(self.spec["num"]),
                                              self.config.model.image_size)["image"]
    with errors.as_user_errors():
      self.explain = explanation.explainer(self.model, self.config.model.pool, self.methods,
                                           str(self.spec["head_fusion"]),
                                           float(self.spec["discard_ratio"]),
                                           self.info.multi_label)

  def check_checkpoint(self, ckpt) -> None:
    super().check_checkpoint(ckpt)
    classification.check_classes(ckpt, self.info)

  def run(self, params) -> base.Result:
    host = surgery.to_layout(jax.device_get(params), scanned=False)
    result = self.explain(host, self.images,
                          np.full(len(self.images), self.target, np.int32))
    cells = explanation.panels(self.images, result, self.methods, self.info.class_names)
    return base.Result({}, {}, {"explain": reports.image_grid(
        cells["columns"], row_labels=cells["row_labels"])})

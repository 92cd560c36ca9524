"""A fine-tuned classifier on one split: every example counted exactly once, the report of
`uniemox_jax.evaluate` (top-1/top-3, per-class accuracy, macro F1, confusion matrix; mAP and
per-class AP for multi-label data)."""
from __future__ import annotations

from typing import Any, Dict

from uniemox_jax import evaluate
from uniemox_jax import models
from uniemox_jax.evaluators import base


class Classification(base.Evaluator):
  reads = base.CLASSIFIER

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.model = models.classification_model(self.config.model, len(self.info["class_names"]))
    # One jitted scorer for the evaluator's life: a run evaluating every epoch compiles once.
    self.scorer = evaluate.classifier_scorer(self.model, bool(self.info.get("multi_label")))

  def check_checkpoint(self, step_dir: str, tree: Dict[str, Any]) -> None:
    super().check_checkpoint(step_dir, tree)
    evaluate.check_classes(step_dir, self.info)

  def run(self, params) -> base.Result:
    report = evaluate.evaluate_classifier(self.config, params, self.split, self.mesh,
                                          self.info, self.data_dir, progress=self.progress,
                                          scorer=self.scorer)
    return base.Result(base.float_scalars(report), report)

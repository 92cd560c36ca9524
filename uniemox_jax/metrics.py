"""Classification metrics of the evaluation report, in NumPy on the host (docs/method.md §5).

Single-label: top-1 / top-k accuracy, per-class accuracy (the recall of each class), macro F1
and the confusion matrix (rows: true class, columns: predicted). Multi-label (EMOTIC): the
average precision of each class (the area under its precision-recall curve as a step function,
the definition scikit-learn uses) and their mean, mAP. The tests check every one against
scikit-learn.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Share of examples whose label is among the k highest scores."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts; entry (i, j): true class i predicted as j."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
  """The share of each class's examples predicted as that class (NaN for an absent class)."""
  totals = matrix.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def f1_per_class(matrix: np.ndarray) -> np.ndarray:
  """F1 of each class; 0 where it has neither examples nor predictions."""
  tp = np.diag(matrix).astype(np.float64)
  denom = matrix.sum(axis=0) + matrix.sum(axis=1)
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """AP of one class: sum over the ranked positives of (recall step) x precision; ties in
  the scores are taken together. NaN when the class has no positive example."""
  positives = targets.sum()
  if positives == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  scores, targets = scores[order], targets[order]
  # The last index of each run of equal scores: thresholds between distinct values.
  last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
  tp = np.cumsum(targets)[last]
  precision = tp / (last + 1)
  recall = tp / positives
  steps = np.diff(np.r_[0.0, recall])
  return float(np.sum(steps * precision))


def classification_report(scores: np.ndarray, labels: np.ndarray,
                          class_names: Sequence[str], top_k: int = 3) -> Dict[str, Any]:
  """Everything the evaluation report holds for single-label data."""
  num_classes = len(class_names)
  predictions = np.argmax(scores, axis=1)
  matrix = confusion_matrix(labels, predictions, num_classes)
  per_class = per_class_accuracy(matrix)
  return {
      "num_examples": int(len(labels)),
      "top1": top_k_accuracy(scores, labels, 1),
      f"top{top_k}": top_k_accuracy(scores, labels, top_k),
      "macro_f1": float(np.mean(f1_per_class(matrix))),
      "per_class_accuracy": {name: _none_if_nan(a) for name, a in zip(class_names, per_class)},
      "confusion_matrix": matrix.tolist(),
      "class_names": list(class_names),
  }


def multilabel_report(scores: np.ndarray, targets: np.ndarray,
                      class_names: Sequence[str]) -> Dict[str, Any]:
  """mAP over the classes that have a positive example, and each class's AP."""
  ap = np.array([average_precision(scores[:, c], targets[:, c])
                 for c in range(targets.shape[1])])
  present = ~np.isnan(ap)
  return {
      "num_examples": int(len(targets)),
      "mAP": float(np.mean(ap[present])) if present.any() else float("nan"),
      "per_class_ap": {name: _none_if_nan(a) for name, a in zip(class_names, ap)},
      "class_names": list(class_names),
  }


def headline(report: Dict[str, Any]) -> float:
  """The number model selection maximizes: top-1, or mAP for multi-label data."""
  return report["mAP"] if "mAP" in report else report["top1"]


def _none_if_nan(x: float) -> Optional[float]:
  return None if np.isnan(x) else float(x)


def format_table(report: Dict[str, Any], title: str = "") -> str:
  """The report as a plain-text table: headline numbers, then one row per class."""
  lines = [title] if title else []
  summary = [k for k in ("num_examples", "top1", "top3", "top5", "macro_f1", "mAP")
             if k in report]
  lines.append("  ".join(f"{k}={report[k]:.4f}" if isinstance(report[k], float)
                         else f"{k}={report[k]}" for k in summary))
  per_class = report.get("per_class_accuracy") or report.get("per_class_ap") or {}
  column = "accuracy" if "per_class_accuracy" in report else "AP"
  width = max([len("class")] + [len(n) for n in per_class])
  lines.append(f"{'class':<{width}}  {column:>8}")
  for name, value in per_class.items():
    lines.append(f"{name:<{width}}  {'-' if value is None else f'{value:.4f}':>8}")
  return "\n".join(lines)

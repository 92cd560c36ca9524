"""What an evaluation writes: the classification report of a split (top-1 / top-3, per-class
accuracy, macro F1, confusion matrix; mAP and per-class AP for multi-label data) as JSON and a
confusion-matrix PNG, and where a checkpoint's evaluations go."""
from __future__ import annotations

import io
import json
from typing import Any, Dict, Sequence

import numpy as np

from data_pipelines import dataset_info
from data_pipelines import storage
from uniemox_jax import metrics


def report(scores: np.ndarray, outputs: Dict[str, np.ndarray], info: dataset_info.DatasetInfo,
           top_k: int = 3) -> Dict[str, Any]:
  """The metrics of `uniemox_jax.metrics` for this dataset's kind (single- or multi-label)."""
  names = list(info.class_names)
  if info.multi_label:
    return metrics.multilabel_report(scores, outputs["labels"], names)
  return metrics.classification_report(scores, outputs["label"], names, top_k=top_k)


def write_report(result: Dict[str, Any], folder: str, name: str) -> Dict[str, str]:
  """FOLDER/<name>_results.json, and for single-label data <name>_confusion.json and .png."""
  storage.makedirs(folder)
  paths = {"results": storage.join(folder, f"{name}_results.json")}
  storage.write_text(paths["results"], json.dumps(result, indent=2))
  if "confusion_matrix" in result:
    paths["confusion_json"] = storage.join(folder, f"{name}_confusion.json")
    storage.write_text(paths["confusion_json"], json.dumps(
        {"class_names": result["class_names"],
         "rows_true_columns_predicted": result["confusion_matrix"]}, indent=2))
    paths["confusion_png"] = storage.join(folder, f"{name}_confusion.png")
    plot_confusion(np.asarray(result["confusion_matrix"]), result["class_names"],
                   paths["confusion_png"], title=name)
  return paths


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str,
                   title: str = "") -> None:
  """The confusion matrix, row-normalized colours, counts written in the cells."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(class_names)
  rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  size = max(4.0, 0.55 * n + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
  ax.set_yticks(range(n), labels=class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
              color="white" if matrix[i, j] > 0.5 * rows[i, 0] else "black")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())


def out_dir(step_dir: str) -> str:
  """WORKDIR/evaluations/<checkpoint dir>-<step> for WORKDIR/<checkpoint dir>/<step>: where a
  checkpoint's evaluations go, beside it."""
  root = storage.dirname(step_dir)
  return storage.join(storage.dirname(root), "evaluations",
                      f"{storage.basename(root)}-{storage.basename(step_dir)}")

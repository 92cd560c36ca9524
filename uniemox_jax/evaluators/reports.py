"""What an evaluation writes: the classification report of a split (top-1 / top-3, per-class
accuracy, macro F1, confusion matrix; mAP and per-class AP for multi-label data) as JSON and a
confusion-matrix PNG, and where a checkpoint's evaluations go."""
from __future__ import annotations

import io
import json
from typing import Any, Dict, Sequence, Tuple

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


def write_report(result: Dict[str, Any], folder: str, name: str,
                 title: str = "") -> Dict[str, str]:
  """FOLDER/<name>_results.json, and for single-label data <name>_confusion.json and .png
  (titled `title`: the dataset, split, checkpoint and step)."""
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
                   paths["confusion_png"], title=title or name)
  return paths


def pyplot():
  """matplotlib's pyplot on the file-only backend (no display on a training host)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str) -> None:
  plt = pyplot()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str,
                   title: str = "") -> None:
  """Two panels: the counts, and the rows normalized (each true class's share of predictions,
  the cell colours of both)."""
  plt = pyplot()
  n = len(class_names)
  shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  size = max(4.0, 0.55 * n + 2)
  fig, axes = plt.subplots(1, 2, figsize=(2 * size, size + 0.4))
  for ax, values, what in ((axes[0], matrix, "counts"), (axes[1], shares, "row-normalized")):
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(what)
    for i in range(n):
      for j in range(n):
        ax.text(j, i, str(values[i, j]) if what == "counts" else f"{values[i, j]:.2f}",
                ha="center", va="center", fontsize=8,
                color="white" if shares[i, j] > 0.5 else "black")
  if title:
    fig.suptitle(title, fontsize=10, wrap=True)
  fig.tight_layout()
  save_figure(fig, path)


def font(size: int = 14):
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  return ImageFont.load_default(size=size)


def fit_text(draw, text: str, width: int, face) -> str:
  """`text`, its start cut off ("...") until it fits `width` pixels: a path keeps its end."""
  if draw.textlength(text, font=face) <= width:
    return text
  while text and draw.textlength("..." + text, font=face) > width:
    text = text[1:]
  return "..." + text


def image_grid(columns: Sequence[Tuple[str, Sequence[np.ndarray]]], title: str = "",
               row_labels: Sequence[str] = (), min_cell: int = 112, gap: int = 4) -> np.ndarray:
  """uint8 [H, W, 3]: one column per (heading, images) under its heading (and `title` above
  them all), each cell enlarged by whole pixels (no smoothing) to at least `min_cell`; a row's
  label, when given, written over its first cell."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  n, s = len(columns[0][1]), columns[0][1][0].shape[0]
  scale = -(-min_cell // s)
  cell = s * scale
  face = font(14)
  top = (22 if title else 0) + 22
  canvas = Image.new("RGB", (len(columns) * (cell + gap) - gap, top + n * (cell + gap) - gap),
                     "white")
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((4, 3), fit_text(draw, title, canvas.width - 8, face), fill="black", font=face)
  for c, (heading, images) in enumerate(columns):
    x = c * (cell + gap)
    heading = fit_text(draw, heading, cell, face)
    draw.text((x + (cell - draw.textlength(heading, font=face)) / 2, top - 19), heading,
              fill="black", font=face)
    for r, image in enumerate(images):
      big = np.repeat(np.repeat(np.asarray(image, np.uint8), scale, axis=0), scale, axis=1)
      canvas.paste(Image.fromarray(big), (x, top + r * (cell + gap)))
  for r, label in enumerate(row_labels):
    y = top + r * (cell + gap)
    text = fit_text(draw, label, cell - 6, face)
    draw.rectangle((0, y, draw.textlength(text, font=face) + 6, y + 19), fill="black")
    draw.text((3, y + 2), text, fill="white", font=face)
  return np.asarray(canvas)


def captioned(image: np.ndarray, lines: Sequence[str], size: int = 14) -> np.ndarray:
  """`image` (uint8 [H, W, 3]) under a white strip with `lines` written on it, each cut from
  its start to the image's width."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  lines = [line for line in lines if line]
  if not lines:
    return image
  strip = len(lines) * (size + 4) + 6
  canvas = Image.new("RGB", (image.shape[1], image.shape[0] + strip), "white")
  canvas.paste(Image.fromarray(image), (0, strip))
  draw, face = ImageDraw.Draw(canvas), font(size)
  for i, line in enumerate(lines):
    draw.text((4, 3 + i * (size + 4)), fit_text(draw, line, image.shape[1] - 8, face),
              fill="black", font=face)
  return np.asarray(canvas)


def out_dir(step_dir: str) -> str:
  """WORKDIR/evaluations/<checkpoint dir>-<step> for WORKDIR/<checkpoint dir>/<step>: where a
  checkpoint's evaluations go, beside it."""
  root = storage.dirname(step_dir)
  return storage.join(storage.dirname(root), "evaluations",
                      f"{storage.basename(root)}-{storage.basename(step_dir)}")

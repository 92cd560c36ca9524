"""Top-k emotions for image files with a fine-tuned checkpoint: the library of the prediction
command (`python -m uniemox_jax.predict`).

Every image gets the eval transform (resize 256, center crop 224) and its top-k emotions with
probabilities (sigmoid scores for multi-label checkpoints). Class names come from the
checkpoint (fine-tuning records them), or from a converted dataset. Unreadable images are
listed, not fatal.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import jax
import numpy as np
from PIL import Image

from data_pipelines import dataset_info
from data_pipelines import storage
from data_pipelines import transforms
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import models
from uniemox_jax import sharding
from uniemox_jax.evaluators import classification

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(root: str) -> List[str]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--images {root} is not a directory")
  found = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not found:
    raise FileNotFoundError(f"--images {root} holds no image ({', '.join(IMAGE_SUFFIXES)})")
  return found


def eval_image(path: str, size: int) -> np.ndarray:
  """An image file through the eval transform: uint8 [size, size, 3]."""
  with Image.open(path) as img:
    return transforms.to_array(transforms.resize_center_crop(
        img.convert("RGB"), transforms.eval_resize(size), size))


def classes_of(ckpt: checkpointing.Checkpoint,
               classes_dir: Optional[str]) -> dataset_info.DatasetInfo:
  """The classes a checkpoint predicts: a converted dataset's (`classes_dir`, --classes), or
  those fine-tuning recorded in the checkpoint; checked against its head."""
  if classes_dir:
    info = dataset_info.DatasetInfo.load(classes_dir, "--classes")
  elif "class_names" in ckpt.meta:
    info = dataset_info.DatasetInfo(name=ckpt.meta.get("dataset", ""), splits={},
                                    class_names=tuple(ckpt.meta["class_names"]),
                                    multi_label=bool(ckpt.meta.get("multi_label")))
  else:
    raise ValueError(f"{ckpt.step_dir} does not record its class names: pass --classes "
                     "DATA_DIR (the converted dataset it was fine-tuned on)")
  classification.check_classes(ckpt, info)
  return info


def predict(config, checkpoint: str, paths: Sequence[str], top_k: int = 3,
            classes_dir: Optional[str] = None, batch_size: int = 32
            ) -> Dict[str, Any]:
  """{"rows": [{"path", "predictions"}], "unreadable": [(path, error)]}."""
  with errors.as_user_errors():
    ckpt = checkpointing.Checkpoint.open(checkpoint)
    info = classes_of(ckpt, classes_dir)
    names = info.class_names
    config = classification.with_checkpoint_pool(config, ckpt)
    mesh = sharding.make_mesh(-1, 1)
    batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    model = models.classification_model(config.model, len(names))
    params = classification.place_classifier(model, ckpt.read(), mesh,
                                             config.model.image_size, what=ckpt.step_dir)
  scorer = classification.classifier_scorer(model, info.multi_label)
  size = config.model.image_size
  rows, unreadable, images, kept = [], [], [], []

  def flush():
    if not images:
      return
    batch = np.zeros((batch_size, size, size, 3), np.uint8)
    batch[:len(images)] = np.stack(images)
    scores = np.asarray(scorer(params, {"image": jax.device_put(
        batch, sharding.batch_sharding(mesh))})["scores"])[:len(images)]
    for path, s in zip(kept, scores):
      top = np.argsort(-s, kind="stable")[:top_k]
      rows.append({"path": path, "predictions": [
          {"emotion": names[i], "probability": float(s[i])} for i in top]})
    images.clear()
    kept.clear()

  for path in paths:
    try:
      images.append(eval_image(path, size))
      kept.append(path)
    except (OSError, ValueError) as e:
      unreadable.append((path, str(e)))
      logging.warning("unreadable image %s: %s", path, e)
    if len(images) == batch_size:
      flush()
  flush()
  return {"rows": rows, "unreadable": unreadable}


def write(result: Dict[str, Any], out: str, root: str, top_k: int) -> None:
  """`result` as CSV (path, then emotion_i, prob_i columns) or JSON, by `out`'s suffix; paths
  relative to `root`."""
  storage.makedirs(storage.dirname(storage.absolute(out)))
  rows = [dict(r, path=os.path.relpath(r["path"], root)) for r in result["rows"]]
  if out.endswith(".json"):
    storage.write_text(out, json.dumps({"predictions": rows, "unreadable": result["unreadable"]},
                                       indent=2))
  elif out.endswith(".csv"):
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["path"] + [c for i in range(1, top_k + 1) for c in (f"emotion_{i}", f"prob_{i}")])
    for r in rows:
      w.writerow([r["path"]] + [v for p in r["predictions"]
                                for v in (p["emotion"], f"{p['probability']:.6f}")])
    storage.write_text(out, text.getvalue())
  else:
    raise errors.UserError(f"--out {out}: write .csv or .json")

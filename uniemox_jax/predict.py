r"""Predict emotions for a folder of images with a fine-tuned checkpoint.

  python -m uniemox_jax.predict --config configs/finetune.py:dataset=emo8,vit=L/16 \
      --checkpoint WORKDIR/best --images photos/ --out predictions.csv --top_k 3

Every image under --images (recursively: .jpg .jpeg .png .bmp .webp) gets the eval transform
(resize 256, center crop 224) and its top-k emotions with probabilities (sigmoid scores for
multi-label checkpoints), written as CSV (path, then emotion_i, prob_i columns) or JSON (a
list of {"path", "predictions": [{"emotion", "probability"}]}), by --out's suffix. Class names
come from the checkpoint (fine-tuning records them), or from --classes (a converted dataset
directory). Unreadable images are listed, not fatal.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from data_pipelines import input_pipeline
from data_pipelines import storage
from data_pipelines import transforms
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import evaluate
from uniemox_jax import models
from uniemox_jax import sharding

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(root: str) -> List[str]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--images {root} is not a directory")
  found = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not found:
    raise FileNotFoundError(f"--images {root} holds no image ({', '.join(IMAGE_SUFFIXES)})")
  return found


def class_names_for(step_dir: str, classes_dir: Optional[str]) -> Dict[str, Any]:
  meta = checkpointing.read_meta(step_dir)
  if classes_dir:
    info = input_pipeline.load_info(classes_dir)
    return {"class_names": info["class_names"], "multi_label": bool(info.get("multi_label"))}
  if "class_names" not in meta:
    raise ValueError(f"{step_dir} does not record its class names: pass --classes DATA_DIR "
                     "(the converted dataset it was fine-tuned on)")
  return {"class_names": meta["class_names"], "multi_label": bool(meta.get("multi_label"))}


def predict(config, checkpoint: str, paths: Sequence[str], top_k: int = 3,
            classes_dir: Optional[str] = None, batch_size: int = 32
            ) -> Dict[str, Any]:
  """{"rows": [{"path", "predictions"}], "unreadable": [(path, error)]}."""
  with errors.as_user_errors():
    step_dir = checkpointing.resolve_step_dir(checkpoint)
    info = class_names_for(step_dir, classes_dir)
    names = info["class_names"]
    evaluate.check_classes(step_dir, {"class_names": names})
    config = evaluate.with_checkpoint_pool(config, step_dir)
    mesh = sharding.make_mesh(-1, 1)
    batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    model = models.classification_model(config.model, len(names))
    params = evaluate.place_classifier(model, checkpointing.read_subtree(step_dir),
                                       mesh, config.model.image_size, what=step_dir)
  scorer = evaluate.classifier_scorer(model, info["multi_label"])
  size = config.model.image_size
  resize = int(round(size / 0.875))
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
      with Image.open(path) as img:
        img = img.convert("RGB")
        images.append(transforms.to_array(transforms.resize_center_crop(img, resize, size)))
      kept.append(path)
    except (OSError, ValueError) as e:
      unreadable.append((path, str(e)))
      logging.warning("unreadable image %s: %s", path, e)
    if len(images) == batch_size:
      flush()
  flush()
  return {"rows": rows, "unreadable": unreadable}


def write(result: Dict[str, Any], out: str, root: str, top_k: int) -> None:
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


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.out.endswith((".csv", ".json")):
    raise app.UsageError(f"--out {f.out}: write .csv or .json")
  with errors.as_user_errors():
    storage.check_writable(storage.dirname(storage.absolute(f.out)))   # before any work
  result = predict(_CONFIG.value, f.checkpoint, list_images(f.images), f.top_k, f.classes,
                   f.batch_size)
  write(result, f.out, f.images, f.top_k)
  print(f"{len(result['rows'])} images; wrote: {storage.absolute(f.out)}"
        + (f"; {len(result['unreadable'])} unreadable (listed in the log)"
           if result["unreadable"] else ""))


_CONFIG = None

if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The fine-tuning config (model "
                                            "fields).", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "A fine-tuned checkpoint (<dir> or <dir>/<step>).")
  flags.DEFINE_string("images", None, "A folder of images (searched recursively).")
  flags.DEFINE_string("out", None, "predictions.csv or predictions.json")
  flags.DEFINE_integer("top_k", 3, "How many emotions per image.")
  flags.DEFINE_string("classes", None, "A converted dataset directory whose class names to "
                      "use, for checkpoints that do not record them.")
  flags.DEFINE_integer("batch_size", 32, "Images per device batch (rounded up to the device "
                       "count).")
  flags.mark_flags_as_required(["config", "checkpoint", "images", "out"])
  from uniemox_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)

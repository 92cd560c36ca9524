r"""What a fine-tuned classifier looks at: heatmaps of the predicted (or a named) emotion over
images (the methods: `uniemox_jax/explanation.py`).

  python -m uniemox_jax.explain --config configs/finetune.py:dataset=emo8 \
      --checkpoint WORKDIR/best --images photos/ --out heatmaps/ [--method rollout,gradcam]
  python -m uniemox_jax.explain --config configs/finetune.py:dataset=emo8 \
      --checkpoint WORKDIR/best --data data/emo8 --split test --num 16 --out heatmaps/ \
      --class awe --head_fusion max --discard_ratio 0.9

Writes OUT/explain.png (image | one overlay per method, each row labelled with the class and
its probability; the first 32 images), OUT/<method>.npy (the raw maps of every image,
[N, g, g] on the patch grid or [N, S, S] per pixel) and OUT/explain.json (each image's path
or record, the class explained, its probability). Unreadable images are listed, not fatal.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

import io  # noqa: E402
import json  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines import dataset_info  # noqa: E402
from data_pipelines import storage  # noqa: E402
from uniemox_jax import checkpointing  # noqa: E402
from uniemox_jax import errors  # noqa: E402
from uniemox_jax import explanation  # noqa: E402
from uniemox_jax import models  # noqa: E402
from uniemox_jax import prediction  # noqa: E402
from uniemox_jax import sharding  # noqa: E402
from uniemox_jax import summaries  # noqa: E402
from uniemox_jax.evaluators import classification  # noqa: E402
from uniemox_jax.evaluators import heatmaps  # noqa: E402
from uniemox_jax.evaluators import reconstruction  # noqa: E402
from uniemox_jax.evaluators import reports  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The fine-tuning config (model "
                                          "fields).", lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A fine-tuned checkpoint (<dir> or "
                                  "<dir>/<step>).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of images (searched recursively).")
_DATA = flags.DEFINE_string("data", None, "Or a converted dataset: the first --num records "
                            "of --split.")
_SPLIT = flags.DEFINE_string("split", "test", "With --data: the split.")
_NUM = flags.DEFINE_integer("num", 8, "With --data: how many records.")
_OUT = flags.DEFINE_string("out", None, "The folder to write.")
_METHOD = flags.DEFINE_list("method", list(explanation.METHODS), "Comma-separated: "
                            + ", ".join(explanation.METHODS))
_CLASS = flags.DEFINE_string("class", heatmaps.PREDICTED, "The emotion to explain: a class "
                             "name, or 'predicted' (each image's top class).")
_HEAD_FUSION = flags.DEFINE_enum("head_fusion", "mean", explanation.HEAD_FUSIONS,
                                 "rollout: how the heads' attention is fused.")
_DISCARD = flags.DEFINE_float("discard_ratio", 0.0, "rollout: the share of each fused "
                              "attention matrix's smallest entries set to zero.")
_GRID_ROWS = 32
_BATCH = 16


def _inputs(size: int):
  """(uint8 images [N, S, S, 3], their names, unreadable (path, error) pairs)."""
  if bool(_IMAGES.value) == bool(_DATA.value):
    raise app.UsageError("give --images DIR or --data DIR (with --split), one of them")
  if _DATA.value:
    images = reconstruction.fixed_images(_DATA.value, _SPLIT.value, _NUM.value, size)["image"]
    return images, [f"{_SPLIT.value}[{i}]" for i in range(len(images))], []
  names, images, unreadable = [], [], []
  for path in prediction.list_images(_IMAGES.value):
    try:
      images.append(prediction.eval_image(path, size))
      names.append(path)
    except (OSError, ValueError) as e:
      unreadable.append((path, str(e)))
      logging.warning("unreadable image %s: %s", path, e)
  if not images:
    raise errors.UserError(f"--images {_IMAGES.value}: no image could be read")
  return np.stack(images), names, unreadable


def main(argv):
  del argv
  out = _OUT.value
  with errors.as_user_errors():
    storage.check_writable(out if storage.exists(out) else storage.dirname(
        storage.absolute(out)))
    methods = explanation.check_methods(_METHOD.value)
    ckpt = checkpointing.Checkpoint.open(_CHECKPOINT.value)
    if "head" not in ckpt.params:
      raise errors.UserError(f"{ckpt.step_dir} has no classification head: explain reads a "
                             "fine-tuned classifier")
    if _DATA.value and "class_names" not in ckpt.meta:
      info = dataset_info.DatasetInfo.load(_DATA.value, "--data")
      classification.check_classes(ckpt, info)
    else:
      info = prediction.classes_of(ckpt, None)
    names = info.class_names
    target = heatmaps.target_index(_CLASS.value, names, "--class")
    config = classification.with_checkpoint_pool(_CONFIG.value, ckpt)
    model = explanation.unrolled(models.classification_model(config.model, len(names)))
    params = classification.place_classifier(model, ckpt.read(), sharding.make_mesh(-1, 1),
                                             config.model.image_size, what=ckpt.step_dir)
    images, labels, unreadable = _inputs(config.model.image_size)
    run = explanation.explainer(model, config.model.pool, methods, _HEAD_FUSION.value,
                                _DISCARD.value, info.multi_label)
  parts = [run(params, images[i:i + _BATCH], np.full(len(images[i:i + _BATCH]), target,
                                                     np.int32))
           for i in range(0, len(images), _BATCH)]
  result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  storage.makedirs(out)
  files = []
  for m in methods:
    buffer = io.BytesIO()
    np.save(buffer, result[m])
    files.append(storage.join(out, f"{m}.npy"))
    storage.write_bytes(files[-1], buffer.getvalue())
  shown = min(len(images), _GRID_ROWS)
  cells = explanation.panels(images[:shown], {k: v[:shown] for k, v in result.items()},
                             methods, names)
  grid = reports.image_grid(cells["columns"], row_labels=cells["row_labels"])
  files.append(storage.join(out, "explain.png"))
  storage.write_bytes(files[-1], summaries.png(reports.captioned(grid, [ckpt.label])))
  rows = [{"image": label, "class": names[int(t)],
           "probability": float(result["probabilities"][i, int(t)])}
          for i, (label, t) in enumerate(zip(labels, result["target"]))]
  files.append(storage.join(out, "explain.json"))
  storage.write_text(files[-1], json.dumps(
      {"checkpoint": ckpt.step_dir, "methods": methods, "head_fusion": _HEAD_FUSION.value,
       "discard_ratio": _DISCARD.value, "images": rows, "unreadable": unreadable}, indent=2))
  print(f"{len(images)} images ({shown} in the grid)"
        + (f", {len(unreadable)} unreadable (listed in explain.json)" if unreadable else "")
        + "; wrote: " + ", ".join(storage.absolute(f) for f in files))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint", "out"])
  cli.run(main)

r"""What a model looks at: heatmaps of the predicted (or a named) emotion over images (the
methods: `uniemox_jax/explanation.py`). A fine-tuned classifier gets rollout, Grad-CAM and
gradient x input; a pretraining checkpoint the map of its fused token's similarity to the
class's CLIP text embedding (--classes or --data names the classes; the config's teacher
embeds them).

  python -m uniemox_jax.explain --config configs/finetune.py:dataset=emo8 \
      --checkpoint WORKDIR/best --images photos/ --out heatmaps/ [--method rollout,gradcam]
  python -m uniemox_jax.explain --config configs/finetune.py:dataset=emo8 \
      --checkpoint WORKDIR/best --data data/emo8 --split test --num 16 --out heatmaps/ \
      --class awe --head_fusion max --discard_ratio 0.9
  python -m uniemox_jax.explain --config configs/pretrain.py:vit=L/16 \
      --checkpoint WORKDIR/checkpoints --data data/emo8 --out heatmaps/

Writes OUT/explain.png (image | one overlay per method, each row labelled with the class and
its probability; the first 32 images), OUT/<method>.npy (the raw maps of every image,
[N, g, g] on the patch grid) and OUT/explain.json (each image's path
or record, the class explained, its probability). Unreadable images are listed, not fatal.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
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
from uniemox_jax.evaluators import zero_shot  # noqa: E402
from uniemox_jax.models import surgery  # noqa: E402
from uniemox_jax.teacher import loading  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The checkpoint's config (model "
                                          "fields; a pretraining config's teacher).",
                                          lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A fine-tuned or pretraining checkpoint "
                                  "(<dir> or <dir>/<step>).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of images (searched recursively).")
_DATA = flags.DEFINE_string("data", None, "Or a converted dataset: the first --num records "
                            "of --split.")
_SPLIT = flags.DEFINE_string("split", "test", "With --data: the split.")
_NUM = flags.DEFINE_integer("num", 8, "With --data: how many records.")
_OUT = flags.DEFINE_string("out", None, "The folder to write.")
_METHOD = flags.DEFINE_list("method", list(explanation.METHODS), "Comma-separated: "
                            + ", ".join(explanation.METHODS))
_CLASSES = flags.DEFINE_string("classes", None, "A converted dataset directory whose class "
                               "names to use: for a pretraining checkpoint, or a classifier "
                               "that does not record them.")
_CLASS = flags.DEFINE_string("class", heatmaps.PREDICTED, "The emotion to explain: a class "
                             "name, or 'predicted' (each image's top class).")
_HEAD_FUSION = flags.DEFINE_enum("head_fusion", "mean", explanation.HEAD_FUSIONS,
                                 "rollout: how the heads' attention is fused.")
_DISCARD = flags.DEFINE_float("discard_ratio", 0.0, "rollout: the share of each fused "
                              "attention matrix's smallest entries set to zero.")
_GRID_ROWS = 32
_BATCH = 16


def _inputs(size: int):
  """(uint8 images and person views [N, S, S, 3], their names, unreadable (path, error)
  pairs). A folder's images are their own person views (no boxes)."""
  if bool(_IMAGES.value) == bool(_DATA.value):
    raise app.UsageError("give --images DIR or --data DIR (with --split), one of them")
  if _DATA.value:
    views = reconstruction.fixed_images(_DATA.value, _SPLIT.value, _NUM.value, size)
    return (views["image"], views["person"],
            [f"{_SPLIT.value}[{i}]" for i in range(len(views["image"]))], [])
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
  return np.stack(images), np.stack(images), names, unreadable


def _classifier(ckpt, config):
  """(class names, methods, (scene, person, target) -> maps) of a fine-tuned checkpoint."""
  if _DATA.value and "class_names" not in ckpt.meta:
    info = dataset_info.DatasetInfo.load(_DATA.value, "--data")
    classification.check_classes(ckpt, info)
  else:
    info = prediction.classes_of(ckpt, _CLASSES.value)
  config = classification.with_checkpoint_pool(config, ckpt)
  model = explanation.unrolled(models.classification_model(config.model,
                                                           len(info.class_names)))
  params = classification.place_classifier(model, ckpt.read(), sharding.make_mesh(-1, 1),
                                           config.model.image_size, what=ckpt.step_dir)
  methods = explanation.check_methods(_METHOD.value)
  run = explanation.explainer(model, config.model.pool, methods, _HEAD_FUSION.value,
                              _DISCARD.value, info.multi_label)
  return info.class_names, methods, lambda scene, _, target: run(params, scene, target)


def _pretrained(ckpt, config):
  """The same for a pretraining checkpoint: its one map, "similarity" (gamma against the
  classes' CLIP text embeddings, by the config's teacher)."""
  classes = _CLASSES.value or _DATA.value
  if not classes:
    raise errors.UserError(f"{ckpt.step_dir} is a pretraining checkpoint: its heatmaps are of "
                           "emotion classes; give --classes DATA_DIR (or --data) for their "
                           "names")
  info = dataset_info.DatasetInfo.load(classes, "--classes" if _CLASSES.value else "--data")
  teacher = loading.load_teacher(config, ckpt.workdir)
  model = explanation.unrolled(models.pretrain_model(config.model))
  size = config.model.image_size
  x, key = jnp.zeros((1, size, size, 3)), jax.random.key(0)
  template = nn.unbox(jax.eval_shape(lambda: model.init(
      {"params": key, "mask": key, "dropout": key}, x, x))["params"])
  params = models.check_params(surgery.to_layout(ckpt.read(), scanned=False), template,
                               ckpt.step_dir)
  run = explanation.similarity_explainer(
      model, zero_shot.class_embeddings(teacher, info.class_names),
      float(teacher.logit_scale(teacher.params)), info.multi_label)
  return info.class_names, ["similarity"], functools.partial(run, params)


def main(argv):
  del argv
  out = _OUT.value
  with errors.as_user_errors():
    storage.check_writable(out if storage.exists(out) else storage.dirname(
        storage.absolute(out)))
    ckpt = checkpointing.Checkpoint.open(_CHECKPOINT.value)
    if "head" in ckpt.params:
      names, methods, run = _classifier(ckpt, _CONFIG.value)
    elif "decoder" in ckpt.params:
      names, methods, run = _pretrained(ckpt, _CONFIG.value)
    else:
      raise errors.UserError(f"{ckpt.step_dir} is neither a fine-tuned classifier (no "
                             "params/head) nor a UniEmoX pretraining checkpoint")
    target = heatmaps.target_index(_CLASS.value, names, "--class")
    images, persons, labels, unreadable = _inputs(_CONFIG.value.model.image_size)
  parts = [run(images[i:i + _BATCH], persons[i:i + _BATCH],
               np.full(len(images[i:i + _BATCH]), target, np.int32))
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

r"""Predict emotions for a folder of images with a fine-tuned checkpoint.

  python -m uniemox_jax.predict --config configs/finetune.py:dataset=emo8,vit=L/16 \
      --checkpoint WORKDIR/best --images photos/ --out predictions.csv --top_k 3

Every image under --images (recursively: .jpg .jpeg .png .bmp .webp) gets the eval transform
(resize 256, center crop 224) and its top-k emotions with probabilities (sigmoid scores for
multi-label checkpoints), written as CSV (path, then emotion_i, prob_i columns) or JSON (a
list of {"path", "predictions": [{"emotion", "probability"}]}), by --out's suffix. Class names
come from the checkpoint (fine-tuning records them), or from --classes (a converted dataset
directory). Unreadable images are listed, not fatal. The library: `uniemox_jax.prediction`.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines import storage  # noqa: E402
from uniemox_jax import errors  # noqa: E402
from uniemox_jax import prediction  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The fine-tuning config (model "
                                          "fields).", lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A fine-tuned checkpoint (<dir> or <dir>/<step>).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of images (searched recursively).")
_OUT = flags.DEFINE_string("out", None, "predictions.csv or predictions.json")
_TOP_K = flags.DEFINE_integer("top_k", 3, "How many emotions per image.")
_CLASSES = flags.DEFINE_string("classes", None, "A converted dataset directory whose class "
                               "names to use, for checkpoints that do not record them.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per device batch (rounded up to "
                                   "the device count).")


def main(argv):
  del argv
  out = _OUT.value
  if not out.endswith((".csv", ".json")):
    raise app.UsageError(f"--out {out}: write .csv or .json")
  with errors.as_user_errors():
    storage.check_writable(storage.dirname(storage.absolute(out)))   # before any work
  result = prediction.predict(_CONFIG.value, _CHECKPOINT.value,
                              prediction.list_images(_IMAGES.value), _TOP_K.value,
                              _CLASSES.value, _BATCH_SIZE.value)
  prediction.write(result, out, _IMAGES.value, _TOP_K.value)
  print(f"{len(result['rows'])} images; wrote: {storage.absolute(out)}"
        + (f"; {len(result['unreadable'])} unreadable (listed in the log)"
           if result["unreadable"] else ""))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint", "images", "out"])
  cli.run(main)

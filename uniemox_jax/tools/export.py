r"""A checkpoint of this codebase -> a timm model folder or an MAE-layout .pth (the library and
the formats: `uniemox_jax/torch_export.py`).

  python -m uniemox_jax.tools.export --checkpoint WORKDIR/best --format timm --out emo8-vit
  python -m uniemox_jax.tools.export --checkpoint gs://b/run/checkpoints --format mae --out pth/

Then, in PyTorch: `timm.create_model("local-dir:emo8-vit", pretrained=True)`. Exit codes: 0
written; 2 a refused flag or checkpoint (one line naming it).
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

from absl import flags  # noqa: E402

from uniemox_jax import torch_export  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoint (<dir> or <dir>/<step>), "
                                  "local or gs://, as the evaluation command reads.")
_FORMAT = flags.DEFINE_enum("format", None, torch_export.FORMATS, "timm: model.safetensors + "
                            "config.json; mae: checkpoint-<step>.pth in MAE's layout.")
_OUT = flags.DEFINE_string("out", None, "The folder to write (new, or empty).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "The input size, for a model with the "
                                   "fixed position table and no config.json beside its "
                                   "checkpoint (default: from the checkpoint).")


def main(argv):
  del argv
  print(torch_export.export(_CHECKPOINT.value, _FORMAT.value, _OUT.value,
                            _IMAGE_SIZE.value).summary())


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "format", "out"])
  cli.run(main)

"""transformers' Flax models from a hub id or a folder written by `save_pretrained`: Flax
weights as they are, PyTorch's (`model.safetensors`, `pytorch_model.bin`) converted on load.
The CLIP teacher (`teacher/clip.py`) and the vision backbones (`models/hf_backbone.py`) load
through here, so a folder is checked, and its problems named, the same way for both."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

# A folder that holds a model has its config and one of these (the first is Flax's; the
# others are PyTorch's, converted on load).
WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")


def is_local(name_or_dir: str) -> bool:
  return os.path.isabs(name_or_dir) or name_or_dir.startswith((".", "~")) or \
      os.path.exists(name_or_dir)


def check_source(name_or_dir: str, what: str, field: str) -> Optional[str]:
  """For a local folder: fails early, naming the path and `field` (the config field that
  named it), when it cannot hold a model, and returns the weight file it will be read from.
  None for a hub id."""
  if not is_local(name_or_dir):
    return None
  path = os.path.expanduser(name_or_dir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} directory {name_or_dir!r} does not exist "
                            f"({field}: a hub id or a local directory)")
  present = set(os.listdir(path))
  weights = [f for f in WEIGHT_FILES if f in present]
  if "config.json" not in present or not weights:
    raise FileNotFoundError(
        f"{what} directory {name_or_dir!r} lacks config.json or a weight file "
        f"({', '.join(WEIGHT_FILES)}); it holds: {sorted(present) or 'nothing'}")
  if weights[0] == "pytorch_model.bin":
    if os.environ.get("USE_TORCH", "AUTO").upper() in ("0", "FALSE", "NO", "OFF"):
      raise ImportError(
          f"{what} directory {name_or_dir!r} holds only pytorch_model.bin, and USE_TORCH "
          "is off (the command-line tools turn it off to import faster): run with USE_TORCH=1, "
          "or save the model as model.safetensors")
    try:
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ImportError(
          f"{what} directory {name_or_dir!r} holds only pytorch_model.bin, which needs "
          "PyTorch to read: pip install -e '.[torch]', or save the model as safetensors "
          "(model.safetensors loads without PyTorch)") from None
  return weights[0]


def from_pretrained(model_class: Any, name_or_dir: str, dtype: Any, what: str,
                    field: str) -> Tuple[Any, Any]:
  """(model, params) of a transformers Flax class (`FlaxCLIPModel`, `FlaxAutoModel`, ...) from
  Flax weights, or from PyTorch weights where a folder (or hub repository) has only those."""
  weight_file = check_source(name_or_dir, what, field)
  from_pt = weight_file is not None and weight_file != "flax_model.msgpack"

  def from_pytorch():
    # transformers 4.57's PyTorch->Flax conversion reads `model.params`, which a model made
    # with _do_init=False refuses: this path initializes, then takes the converted weights.
    model = model_class.from_pretrained(name_or_dir, dtype=dtype, from_pt=True)
    return model, model.params
  try:
    if from_pt:
      return from_pytorch()
    return model_class.from_pretrained(name_or_dir, dtype=dtype, _do_init=False)
  except (OSError, ValueError) as e:
    if not from_pt and weight_file is None and "from_pt=True" in str(e):
      return from_pytorch()
    raise OSError(f"could not load the {what} from {name_or_dir!r} ({field}): {e}") from e

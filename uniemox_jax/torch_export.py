r"""This codebase's checkpoints -> where PyTorch users work: the library of the export command
(`python -m uniemox_jax.tools.export`), the inverse of `uniemox_jax.torch_import`.

  python -m uniemox_jax.tools.export --checkpoint WORKDIR/best --format timm --out emo8-vit-l16
  python -m uniemox_jax.tools.export --checkpoint WORKDIR/checkpoints --format mae --out pth/

Formats:
  timm  a folder as timm loads a hub model from: `model.safetensors` (timm's VisionTransformer
        state dict) and `config.json` (architecture, num_classes, label_names, model_args with
        the shape, global_pool and fc_norm, pretrained_cfg with the input size, mean/std, crop
        and interpolation of our eval transform). `timm.create_model("local-dir:DIR",
        pretrained=True)` builds it, as does "hf-hub:USER/REPO" once the folder is uploaded. A
        fine-tuned classifier keeps its head and pooling (avg + fc_norm, or the CLS token after
        the final norm); a pretraining checkpoint gives its encoder, no head (CLS features).
  mae   `checkpoint-<step>.pth` holding {"model": state_dict} in facebookresearch/mae's names:
        the encoder, the decoder (decoder_embed is also UniEmoX's student projection) with the
        fixed position tables MAE keeps in its state dict; the authors' fusion as their
        pretraining script saves it, an "att_fusion" entry ({bn,linear}.{weight,bias}) beside
        "model"; a classifier in MAE's fine-tuned layout (fc_norm, head).
        No argparse `args` beside the weights, so `torch.load` with its default weights-only
        loader reads the file. Importing it again (`tools.import_torch`) gives the same arrays
        bit for bit.

The checkpoint is read in the unrolled block layout whatever layout it was saved in, in
float32. safetensors files are written without PyTorch; `.pth` needs it.
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from data_pipelines import storage
from data_pipelines import transforms
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import torch_import
from uniemox_jax import torch_layout
from uniemox_jax.augment import IMAGENET_MEAN, IMAGENET_STD
from uniemox_jax.models import surgery
from uniemox_jax.models import vit

FORMATS = ("timm", "mae")
# Our eval transform (data_pipelines/input_pipeline.py EvalTransform): resize the shorter side
# bicubically to size / crop_pct, center crop.
INTERPOLATION = "bicubic"
# timm's registered names for our sizes; any other shape takes the base one, the shape given
# in full by model_args (which timm applies over the architecture's defaults).
TIMM_ARCHITECTURES = {"Ti/16": "vit_tiny_patch16_224", "S/16": "vit_small_patch16_224",
                      "S/32": "vit_small_patch32_224", "B/16": "vit_base_patch16_224",
                      "B/32": "vit_base_patch32_224", "L/16": "vit_large_patch16_224",
                      "L/32": "vit_large_patch32_224", "H/14": "vit_huge_patch14_224"}
DEFAULT_ARCHITECTURE = "vit_base_patch16_224"


def _depth_and_heads(transformer: Mapping[str, Any]) -> Tuple[int, int]:
  """(depth, heads) of a block stack."""
  return len(transformer), transformer["block_0"]["attn"]["qkv"]["kernel"].shape[2]


def encoder_shape(encoder: Mapping[str, Any]) -> vit.VitShape:
  """A ViT encoder's shape, read from its parameters (the head count from the qkv kernel)."""
  kernel = encoder["patch_embed"]["proj"]["kernel"]          # [p, p, 3, width]
  depth, heads = _depth_and_heads(encoder["transformer"])
  return vit.VitShape(kernel.shape[-1], depth, heads,
                      encoder["transformer"]["block_0"]["mlp"]["fc1"]["kernel"].shape[1],
                      kernel.shape[0])


def _size_name(shape: vit.VitShape) -> Optional[str]:
  """Our size name ("L/16"), or None for a shape no size has."""
  return next((f"{name}/{shape.patch}" for name, size in vit.VIT_SIZES.items()
               if size == (shape.width, shape.depth, shape.heads, shape.mlp_dim)), None)


@dataclasses.dataclass
class Export:
  """What an export wrote and left out."""
  checkpoint: str
  format: str
  files: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return "\n".join([f"exported {self.checkpoint} as {self.format}"]
                     + [f"  note: {n}" for n in self.notes] + ["wrote: " + ", ".join(self.files)])


# --- our parameters -> PyTorch state dicts (torch_layout's names, read backwards) ----------


def encoder_state_dict(encoder: Mapping[str, Any], image_size: int) -> Dict[str, np.ndarray]:
  """timm's (and MAE's) encoder keys. A model with the fixed sin-cos table gets it written out,
  as MAE keeps it and timm's learned table takes it."""
  shape = encoder_shape(encoder)
  table = encoder.get("pos_embed")
  if table is None:
    table = vit.sincos_2d(shape.width, vit.grid_size(image_size, shape.patch), True)[None]
  return {"pos_embed": table,
          **torch_layout.write({"encoder": encoder}, torch_layout.encoder(shape.depth,
                                                                          shape.heads))}


def classifier_state_dict(params: Mapping[str, Any], image_size: int) -> Dict[str, np.ndarray]:
  return {**encoder_state_dict(params["encoder"], image_size),
          **torch_layout.write(params, torch_layout.head())}


def pretrain_state_dict(params: Mapping[str, Any], image_size: int) -> Dict[str, np.ndarray]:
  """MAE's pretraining keys (models_mae.py's MaskedAutoencoderViT)."""
  dec = params["decoder"]
  grid = vit.grid_size(image_size, encoder_shape(params["encoder"]).patch)
  return {**encoder_state_dict(params["encoder"], image_size),
          "decoder_pos_embed": vit.sincos_2d(dec["embed"]["kernel"].shape[1], grid, True)[None],
          **torch_layout.write(params, torch_layout.decoder(*_depth_and_heads(dec["transformer"])))}


def fusion_state_dict(fuse: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The authors' AttentionFusion (its `bn`, `linear`), saved beside their model."""
  if set(fuse) != {"norm", "proj"}:
    raise errors.UserError(
        f"its fusion has parameters {sorted(fuse)}: only the method's default fusion ('easy': "
        "LN, Dense, ELU) has a layout in the authors' code; export --format timm for the "
        "encoder alone")
  return torch_layout.write({"fuse": fuse}, torch_layout.fusion())


# --- the export ---------------------------------------------------------------------------


def _image_size(ckpt: checkpointing.Checkpoint, encoder: Mapping[str, Any],
                given: Optional[int], notes: List[str]) -> int:
  """--image_size, else the learned position table's grid, else the run's config.json."""
  patch = encoder_shape(encoder).patch
  if given:
    return given
  if "pos_embed" in encoder:
    return int(round((encoder["pos_embed"].shape[1] - 1) ** 0.5)) * patch
  config_path = storage.join(ckpt.workdir, "config.json")
  if storage.exists(config_path):
    return int(json.loads(storage.read_text(config_path))["model"]["image_size"])
  notes.append("image size 224 (no learned position table and no config.json beside the "
               "checkpoint; pass --image_size if it was trained at another)")
  return 224


def _timm_config(params: Mapping[str, Any], ckpt: checkpointing.Checkpoint, image_size: int,
                 shape: vit.VitShape) -> Dict[str, Any]:
  meta = ckpt.meta
  classes = params["head"]["kernel"].shape[1] if "head" in params else 0
  pool = "avg" if "fc_norm" in params else "token"
  architecture = TIMM_ARCHITECTURES.get(_size_name(shape) or "", DEFAULT_ARCHITECTURE)
  config: Dict[str, Any] = {
      "architecture": architecture, "num_classes": classes, "num_features": shape.width,
      "global_pool": pool,
      "model_args": {"img_size": image_size, "patch_size": shape.patch,
                     "embed_dim": shape.width, "depth": shape.depth,
                     "num_heads": shape.heads, "mlp_ratio": shape.mlp_dim / shape.width,
                     "qkv_bias": True, "class_token": True, "global_pool": pool,
                     "fc_norm": pool == "avg", "num_classes": classes},
      "pretrained_cfg": {"architecture": architecture, "input_size": [3, image_size, image_size],
                         "fixed_input_size": True, "interpolation": INTERPOLATION,
                         "crop_pct": transforms.EVAL_CROP_PCT, "crop_mode": "center",
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                         "num_classes": classes, "first_conv": "patch_embed.proj",
                         "classifier": "head"},
      # Ours, beside timm's fields (timm reads the ones above and ignores the rest).
      "uniemox": {"checkpoint": ckpt.step_dir, "step": ckpt.step,
                  **{key: meta[key] for key in ("task", "dataset", "multi_label", "kind",
                                                "source") if key in meta}}}
  names = meta.get("class_names")
  if names and len(names) == classes:
    config["label_names"] = list(names)
  return config


def _torch_bytes(obj: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
  """torch.save of {entry: state dict} (NumPy arrays as tensors)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UserError("--format mae writes a .pth, which needs PyTorch: "
                           "pip install '.[torch]'") from None
  buffer = io.BytesIO()
  torch.save({k: {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in d.items()}
              for k, d in obj.items()}, buffer)
  return buffer.getvalue()


def _safetensors_bytes(sd: Mapping[str, np.ndarray]) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save({k: np.ascontiguousarray(v) for k, v in sd.items()}, metadata={"format": "pt"})


def export(checkpoint: str, fmt: str, out: str, image_size: Optional[int] = None) -> Export:
  """Writes `checkpoint` ("<dir>" or "<dir>/<step>") in format `fmt` into the folder `out`
  (created; refused if it holds anything)."""
  if fmt not in FORMATS:
    raise errors.UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
  if storage.exists(out) and storage.listdir(out):
    raise errors.UserError(f"--out {out} is not empty; export into a new folder")
  ckpt = checkpointing.Checkpoint.open(checkpoint)
  if "encoder" not in ckpt.params:
    raise errors.UserError(f"--checkpoint {ckpt.step_dir}: its parameters "
                           f"({', '.join(sorted(ckpt.params))}) hold no ViT encoder")
  # Unrolled, float32 (bfloat16 parameters widened: what PyTorch ViTs hold).
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        surgery.to_layout(ckpt.read(("params",)), scanned=False))
  done = Export(ckpt.step_dir, fmt)
  size = _image_size(ckpt, params["encoder"], image_size, done.notes)
  shape = encoder_shape(params["encoder"])
  classifier = "head" in params
  if not classifier and "norm" not in params["encoder"]:
    raise errors.UserError(f"--checkpoint {ckpt.step_dir}: an encoder without its final norm "
                           "and without a head: neither timm nor MAE has that model")
  if fmt == "timm":
    sd = (classifier_state_dict(params, size) if classifier
          else encoder_state_dict(params["encoder"], size))
    left = sorted(k for k in params if k not in ("encoder", "head", "fc_norm"))
    if left:
      done.notes.append(f"left out {', '.join(left)}: a timm ViT is the encoder"
                        + (" and its head" if classifier else " (no head: CLS features)"))
    files = {"model.safetensors": _safetensors_bytes(sd),
             "config.json": json.dumps(_timm_config(params, ckpt, size, shape),
                                       indent=2).encode()}
  else:
    if classifier:
      sd = classifier_state_dict(params, size)
    elif "decoder" in params:
      sd = pretrain_state_dict(params, size)
    else:
      raise errors.UserError(f"--checkpoint {ckpt.step_dir}: an encoder without a decoder or "
                             "a head is not an MAE checkpoint; use --format timm")
    saved = {"model": sd}
    if "fuse" in params and not classifier:
      saved[torch_import.AUTHORS_FUSION] = fusion_state_dict(params["fuse"])
    files = {f"checkpoint-{ckpt.step}.pth": _torch_bytes(saved)}
  storage.makedirs(out)
  for name, data in files.items():
    path = storage.join(out, name)
    storage.write_bytes(path, data)
    done.files.append(storage.absolute(path))
  return done


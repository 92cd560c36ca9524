r"""PyTorch checkpoints -> this codebase's Flax parameters: the library of the import command
(`python -m uniemox_jax.tools.import_torch`, which writes them as an orbax checkpoint) and of
the trainer's `torch_*` encoder formats (`uniemox_jax.importers`).

  python -m uniemox_jax.tools.import_torch --src mae_pretrain_vit_large.pth --kind mae \
      --vit L/16 --out /ckpt/mae-l16

Kinds (the layouts of the files users have):
  mae               facebookresearch/mae `mae_pretrain_vit_{base,large,huge}.pth`: encoder
                    (patch_embed, cls_token, fixed pos_embed, blocks.i, norm) and, where
                    present, the decoder (decoder_embed, mask_token, decoder_blocks.i,
                    decoder_norm, decoder_pred).
  vit               a ViT classifier: MAE fine-tuned checkpoints and timm `vit_*_patch16_224`
                    state dicts (learned pos_embed, norm or fc_norm, head). The pooling is
                    recorded for evaluation: fc_norm means the average of the patch tokens
                    (MAE), a final norm without it timm's default, the CLS token.
  uniemox_pretrain  the authors' pretrained UniEmoX: the MAE layout plus the fusion
                    (`*fusion*.linear.*`, `*fusion*.bn.*`: ELU(Linear(LN(a) + LN(b)))),
                    which their script saves as an "att_fusion" entry beside "model".
  uniemox_finetune  the authors' fine-tuned classifiers: the vit layout with fc_norm and head.

The ViT size comes from --vit or from the file: its width, depth and MLP width must be a
known size's, and the model name MAE's script saves beside the weights (`args.model`) must
agree; the head count is not in the shapes, so a file of another shape is refused and --vit
asked for.

Files may be a bare state dict or a dict with a "model" (or "state_dict") entry; a `module.`
prefix (DistributedDataParallel) is removed. A position table for another grid is resampled
(bicubic) to --image_size. Every source key ends up loaded, deliberately dropped (listed with
the reason) or reported as unexpected; every target array is loaded or reported missing;
shapes are checked. Anything unexpected, missing or mis-shaped stops the import with the list.

The output directory is a checkpoint of this codebase (`<out>/0/`, state {"step", "params"}
plus a `meta` record of the kind, source and class count), which `--config.init.encoder=<out>`
(format `uniemox_jax`) and `uniemox_jax.evaluate --checkpoint <out>` (classification for the
fine-tuned kinds; zero-shot, linear probe, reconstruction for uniemox_pretrain) read directly. The trainer can also read a .pth
directly: --config.init.encoder=FILE.pth --config.init.encoder_format=torch_mae (or torch_vit,
torch_uniemox_pretrain, torch_uniemox_finetune).

PyTorch is an optional extra (`pip install .[torch]`), imported only here.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from data_pipelines import storage
from uniemox_jax import torch_layout
from uniemox_jax.models import surgery
from uniemox_jax.models import vit

KINDS = ("mae", "vit", "uniemox_pretrain", "uniemox_finetune")
AUTHORS_FUSION = "att_fusion"     # the entry of the authors' checkpoints that holds the fusion


@dataclasses.dataclass
class ImportReport:
  source: str
  loaded: List[str] = dataclasses.field(default_factory=list)        # source keys used
  dropped: Dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why
  unexpected: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)       # target arrays
  misshaped: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)

  @property
  def problems(self) -> List[str]:
    return ([f"unexpected key {k}" for k in self.unexpected]
            + [f"missing {k}" for k in self.missing] + self.misshaped)

  def check(self) -> None:
    if self.problems:
      raise ValueError(f"{self.source} does not fit the model:\n  "
                       + "\n  ".join(self.problems)
                       + (f"\n(dropped as expected: {sorted(self.dropped)})"
                          if self.dropped else ""))

  def summary(self) -> str:
    lines = [f"{self.source}: loaded {len(self.loaded)} arrays"]
    lines += [f"  dropped {k}: {why}" for k, why in sorted(self.dropped.items())]
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


# --- reading the file ---------------------------------------------------------------------


class StateDict(dict):
  """{key: array} of a file, with the model name its training script saved beside the
  weights (MAE's `args.model`, e.g. "mae_vit_large_patch16"), when there is one."""
  model_name: Optional[str] = None


def load_state_dict(path: str) -> StateDict:
  """A PyTorch checkpoint file -> {key: float32/int NumPy array}, unwrapped and unprefixed.
  Files saved by MAE's training script (and the reference's, built on it) keep their argparse
  `args` beside the weights: allowed through torch's weights-only loader, and their
  `args.model` kept as `model_name`."""
  if not storage.isfile(path):
    raise FileNotFoundError(f"--src {path} does not exist")
  path = storage.local_copy(path)     # from a bucket: copied once into this host's cache
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      raw = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("reading .pth files needs PyTorch: pip install '.[torch]'") from None
    try:
      import argparse  # pylint: disable=g-import-not-at-top
      with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or not a "
                       f"torch.save file): {type(e).__name__}: {e}") from None
  model_name = None
  if isinstance(raw, Mapping):
    model_name = getattr(raw.get("args"), "model", None)
    # The authors' pretraining saves its fusion beside the model (main_pretrain.py:
    # {"model": ..., "att_fusion": ...}); its keys join the state dict under that name.
    fusion = raw.get(AUTHORS_FUSION)
    for key in ("model", "state_dict", "model_state_dict"):
      if key in raw and isinstance(raw[key], Mapping):
        raw = dict(raw[key])
        if isinstance(fusion, Mapping):
          raw.update({f"{AUTHORS_FUSION}.{k}": v for k, v in fusion.items()})
        break
  if not isinstance(raw, Mapping) or not raw:
    raise ValueError(f"{path} holds no state dict (got {type(raw).__name__})")
  out = StateDict()
  out.model_name = model_name if isinstance(model_name, str) else None
  for key, value in raw.items():
    if not hasattr(value, "shape"):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    key = key[len("module."):] if key.startswith("module.") else key
    arr = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value)
    out[key] = arr
  return out


# --- layouts ------------------------------------------------------------------------------


def resample_pos_embed(table: np.ndarray, grid: int) -> np.ndarray:
  """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: the patch rows resized bicubically as an image,
  the CLS row kept."""
  n = table.shape[1] - 1
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f"position table of {n} patches is not a square grid")
  if side == grid:
    return table
  patches = table[0, 1:].reshape(side, side, -1)
  resized = np.asarray(jax.image.resize(patches, (grid, grid, patches.shape[-1]), "bicubic"))
  return np.concatenate([table[:, :1], resized.reshape(1, grid * grid, -1)], axis=1)


def _is_sincos(table: np.ndarray, width: Optional[int] = None) -> bool:
  """MAE's fixed table (of `width`, else the table's own), which our models compute."""
  side = int(round((table.shape[1] - 1) ** 0.5))
  fixed = vit.sincos_2d(width or table.shape[-1], side, cls_token=True)
  return table.shape[1:] == fixed.shape and np.allclose(table[0], fixed, atol=1e-5)


def _position_tables(sd, params, report: ImportReport, width: int, grid: int,
                     learned: bool) -> None:
  """The encoder's table (kept, resampled to `grid`, when the model learns one; dropped when
  it is the fixed one) and the decoder's (always the fixed one)."""
  if "pos_embed" in sd:
    table = sd["pos_embed"]
    if learned:
      report.loaded.append("pos_embed")
      params["encoder"]["pos_embed"] = resample_pos_embed(table, grid)
      if table.shape[1] != grid * grid + 1:
        report.notes.append(f"pos_embed resampled from {table.shape[1] - 1} to "
                            f"{grid * grid} patches")
    elif _is_sincos(table, width):
      report.dropped["pos_embed"] = "MAE's fixed sin-cos table, which the encoder computes itself"
    else:
      report.unexpected.append("pos_embed (a learned table: import into a model with "
                               "pos_embed='learned', i.e. --pos_embed learned)")
  if "decoder_pos_embed" in sd and "decoder" in params:
    if _is_sincos(sd["decoder_pos_embed"]):
      report.dropped["decoder_pos_embed"] = "MAE's fixed sin-cos table, computed by the decoder"
    else:
      report.unexpected.append("decoder_pos_embed (not the fixed sin-cos table)")


def _fusion_keys(sd, report: ImportReport) -> List[torch_layout.Key]:
  keys = [k for k in sd if re.search(r"fusion.*\.linear\.weight$", k)]
  if len(keys) != 1:
    report.missing.append("the fusion (one '*fusion*.linear.weight' key; found "
                          f"{keys or 'none'})")
    return []
  return torch_layout.fusion(keys[0][:-len("linear.weight")])


def convert(sd: Dict[str, np.ndarray], kind: str, variant: str, image_size: int = 224, *,
            source: str = "state dict", pos_embed: Optional[str] = None,
            decoder_heads: int = 16) -> Tuple[Dict[str, Any], ImportReport]:
  """(params, report). params: {"encoder", and "decoder" / "fuse" (pretraining kinds, when
  present) or "fc_norm" / "head" (classifier kinds, when present)} in this codebase's layout.
  `pos_embed` ("sincos" | "learned") defaults to "sincos" for the pretraining kinds and
  "learned" for the classifier kinds."""
  if kind not in KINDS:
    raise ValueError(f"--kind {kind!r}: choose one of {KINDS}")
  shape = vit.decode_variant(variant)
  report = ImportReport(source)
  classifier = kind in ("vit", "uniemox_finetune")
  keys = torch_layout.encoder(shape.depth, shape.heads)
  if classifier:
    keys += torch_layout.head()
  else:
    if "decoder_embed.weight" in sd:
      depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
      keys += torch_layout.decoder(depth, decoder_heads)
    elif kind == "uniemox_pretrain":
      report.missing.append("the decoder (decoder_embed.*): a UniEmoX pretraining checkpoint "
                            "has one")
    if kind == "uniemox_pretrain":
      keys += _fusion_keys(sd, report)
    for key in ("head.weight", "head.bias"):
      if key in sd:
        report.dropped[key] = "a classification head, not part of pretraining"
  params, report.loaded = torch_layout.read(sd, keys)
  params.setdefault("encoder", {})
  if kind == "uniemox_pretrain" and "fuse" not in params:
    params["fuse"] = {}
  w = sd.get("patch_embed.proj.weight")
  if w is not None and w.shape[2:] != (shape.patch, shape.patch):
    report.misshaped.append(f"patch_embed.proj.weight: patch {w.shape[2:]} != the model's "
                            f"{shape.patch}")
  _position_tables(sd, params, report, shape.width, vit.grid_size(image_size, shape.patch),
                   (pos_embed or ("learned" if classifier else "sincos")) == "learned")
  if kind == "uniemox_finetune" and not {"fc_norm", "head"} <= set(params):
    report.missing.append("fc_norm and head (a UniEmoX fine-tuned classifier has both)")
  if "norm" in params["encoder"] and "fc_norm" in params:
    report.notes.append("both norm and fc_norm present: the classifier uses fc_norm")
  report.unexpected += sorted(k for k in sd if k not in report.loaded and k not in
                              report.dropped and not any(k in u for u in report.unexpected))
  return params, report


def fit_to(params: Dict[str, Any], template: Mapping[str, Any], report: ImportReport,
           where: str = "") -> Dict[str, Any]:
  """`params` shaped as `template` (a model's params, `surgery.fit`): blocks stacked for a
  scanned model, dtypes matched; what does not fit is added to `report`."""
  out, fitted = surgery.fit(params, template, prefix=where, source_name="file")
  report.missing += fitted.missing
  report.misshaped += fitted.misshaped
  report.unexpected += [f"{k} (converted, but the model has no such array)"
                        for k in fitted.unexpected]
  return out


# --- the trainer's hook and the output checkpoint ---------------------------------------------


def encoder_importer(kind: str):
  """An importer for importers.ENCODER_IMPORTERS: (file, encoder template) -> encoder params."""
  def load(path: str, template: Any) -> Any:
    sd = load_state_dict(path)
    variant = variant_of(sd, path)
    image_size = _template_image_size(template, variant)
    learned = "pos_embed" in template
    params, report = convert(sd, kind, variant, image_size, source=path,
                             pos_embed="learned" if learned else "sincos")
    # Only the encoder is asked for: what else the file holds (a head, a decoder) is dropped
    # on purpose, and so is the final norm when the model has none (a classifier's fc_norm
    # replaces it).
    template = dict(template)
    encoder = params["encoder"]
    if "norm" not in template and encoder.pop("norm", None) is not None:
      for key in ("norm.weight", "norm.bias"):
        report.dropped[key] = "the encoder's final norm: the model has none (fc_norm instead)"
    for key in sd:
      if not key.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")):
        report.dropped.setdefault(key, "not part of the encoder")
    report.loaded = [k for k in report.loaded if k not in report.dropped]
    report.unexpected = [k for k in report.unexpected if k not in report.dropped]
    encoder = fit_to(encoder, template, report, "encoder/")
    report.check()
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.info("%s", report.summary())
    return encoder
  return load


def _template_image_size(template, variant: str) -> int:
  patch = vit.decode_variant(variant).patch
  if "pos_embed" in template:
    n = np.shape(template["pos_embed"])[1] - 1
    return int(round(n ** 0.5)) * patch
  return 224


def write_checkpoint(params: Dict[str, Any], out: str, meta: Dict[str, Any]) -> str:
  """Writes `params` as step 0 of a checkpoint directory; returns the step directory."""
  from uniemox_jax import checkpointing  # pylint: disable=g-import-not-at-top
  if storage.exists(storage.join(out, "0")):
    raise FileExistsError(f"--out {out} already holds a checkpoint (step 0); choose another")
  ckpt = checkpointing.Checkpointer(out, keep=1, asynchronous=False)
  ckpt.save(0, {"step": np.int32(0), "params": params}, meta=meta)
  ckpt.close()
  return storage.join(storage.absolute(out), "0")


# Words of model names (timm's, MAE's "mae_vit_large_patch16") -> our ViT sizes.
_SIZE_WORDS = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}


def variant_of(sd: Mapping[str, np.ndarray], path: str) -> str:
  """The ViT size of a state dict. Shapes give the width, depth and MLP width but not the head
  count, which the qkv projection hides: the size is taken only when those shapes are a known
  size's and nothing in the file contradicts its head count (the model name saved beside MAE
  weights, a relative position table's last axis); otherwise the import is refused and asks
  for --vit."""
  if "patch_embed.proj.weight" not in sd:
    raise ValueError(f"{path}: no patch_embed.proj.weight; is it a ViT? (pass --vit)")
  w = sd["patch_embed.proj.weight"]
  width, patch = w.shape[0], w.shape[-1]
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  fc1 = sd.get("blocks.0.mlp.fc1.weight")
  mlp = None if fc1 is None else fc1.shape[0]
  found = f"{depth} blocks of width {width}" + (f", MLP width {mlp}" if mlp else "")
  sizes = [n for n, (wd, d, _, m) in vit.VIT_SIZES.items()
           if wd == width and d == depth and mlp in (None, m)]
  if len(sizes) != 1:
    near = [n for n, (wd, d, _, _) in vit.VIT_SIZES.items() if wd == width and d == depth]
    why = (f"like {near[0]} but with another MLP width, so its head count is unknown too"
           if near else "no known ViT size")
    raise ValueError(f"{path}: {found}: {why}; pass --vit SIZE/PATCH for the model it is "
                     f"(sizes: {', '.join(f'{n} {v}' for n, v in vit.VIT_SIZES.items())})")
  size = sizes[0]
  heads = vit.VIT_SIZES[size][2]
  name = getattr(sd, "model_name", None)
  if name:
    words = [_SIZE_WORDS[t] for t in re.split(r"[_\-]", name.lower()) if t in _SIZE_WORDS]
    if words and words[0] != size:
      raise ValueError(f"{path}: its weights are {found} ({size}), but the file names its model "
                       f"{name!r} ({words[0]}): pass --vit to say which it is")
  for key, table in sd.items():
    if key.endswith("relative_position_bias_table") and table.shape[-1] != heads:
      raise ValueError(f"{path}: {key} has {table.shape[-1]} heads, the {size} size has "
                       f"{heads}: pass --vit for the model it is")
  return f"{size}/{patch}"


"""The vision backbones of transformers' Flax models (ResNet, RegNet, ViT, BEiT, DINOv2) as the
encoder of a classifier or a linear probe: the reference's baselines (a linear head on frozen
ImageNet backbones, and fine-tuned ones).

`config.model.backbone` names one: a hub id ("microsoft/resnet-50") or a folder written by
`save_pretrained` (Flax weights, or PyTorch's, converted as the teacher's are); its weights
are the starting point. The images (ImageNet-normalized, as for every model here) are mapped
to the backbone's own normalization (its preprocessor_config.json, when it has one). Pooled
features: the backbone's pooler output (global average pooling for ResNet and RegNet; BEiT's
mean pooling; DINOv2's CLS token), for ViT the CLS token after its final norm (what
transformers' ViT classifier reads; its tanh pooler is left out), then the same Dense head as
our ViT classifier. BatchNorm statistics stay as pretrained (the step holds no mutable
state): they ride in the parameter tree behind `stop_gradient`, and their zero gradients
leave them unchanged under AdamW (no weight decay on them, `optim.decay_mask`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax import augment
from uniemox_jax import hf_weights
from uniemox_jax.models import classifier
from uniemox_jax.models import surgery

FIELD = "config.model.backbone"
# Families whose pooled feature is the CLS token of the last hidden state.
CLS_FAMILIES = ("vit",)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  source: str
  hf_config: Any                     # the transformers config
  model_class: Any                   # FlaxResNetModel, ...
  mean: Tuple[float, float, float]   # the backbone's input normalization
  std: Tuple[float, float, float]

  @property
  def family(self) -> str:
    return self.hf_config.model_type

  def module(self, dtype: Any) -> nn.Module:
    """A fresh, unbound transformers module (applied as a pure function)."""
    kwargs = {"add_pooling_layer": False} if self.family in CLS_FAMILIES else {}
    return self.model_class.module_class(config=self.hf_config, dtype=dtype, parent=None,
                                         **kwargs)

  @property
  def image_size(self) -> Optional[int]:
    """The input side the backbone is fixed to (a ViT's position table), or None."""
    size = getattr(self.hf_config, "image_size", None)
    return int(size) if size and self.family in ("vit", "beit") else None


def _vision_families():
  from transformers.models.auto import modeling_flax_auto  # pylint: disable=g-import-not-at-top
  return sorted(modeling_flax_auto.FLAX_MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def _normalization(source: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  from transformers.utils import cached_file  # pylint: disable=g-import-not-at-top
  path = cached_file(source, "preprocessor_config.json",
                     _raise_exceptions_for_missing_entries=False,
                     _raise_exceptions_for_connection_errors=False)
  if path:
    with open(path) as f:
      processor = json.load(f)
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean and std:
      return tuple(map(float, mean)), tuple(map(float, std))
  return augment.IMAGENET_MEAN, augment.IMAGENET_STD


@functools.lru_cache(maxsize=8)
def backbone_spec(source: str) -> BackboneSpec:
  """What `config.model.backbone` names: its config, Flax model class and normalization."""
  from transformers import AutoConfig, FlaxAutoModel  # pylint: disable=g-import-not-at-top
  hf_weights.check_source(source, "backbone", FIELD)
  try:
    hf_config = AutoConfig.from_pretrained(source)
  except (OSError, ValueError) as e:
    raise OSError(f"{FIELD}={source!r}: its config cannot be read: {e}") from e
  families = _vision_families()
  if hf_config.model_type not in families:
    raise ValueError(f"{FIELD}={source!r} is a {hf_config.model_type!r} model; the vision "
                     f"backbones with Flax models in transformers are {families}")
  mean, std = _normalization(source)
  return BackboneSpec(source, hf_config, FlaxAutoModel._model_mapping[type(hf_config)],  # pylint: disable=protected-access
                      mean, std)


def load_variables(source: str) -> Dict[str, Any]:
  """The backbone's pretrained variables ({"params"[, "batch_stats"]}) as host arrays, checked
  against the model: every array present, none left over (a classification head of the
  checkpoint is dropped), every shape right; anything else raises, naming the keys."""
  spec = backbone_spec(source)
  weight_file = hf_weights.check_source(source, "backbone", FIELD)
  if weight_file in (None, "flax_model.msgpack"):
    try:
      _, params = spec.model_class.from_pretrained(source, _do_init=False)
      params = dict(params)
      return _checked(spec, params if "params" in params else {"params": params})
    except (OSError, ValueError) as e:
      if weight_file is not None or "from_pt=True" not in str(e):
        raise OSError(f"could not load the backbone from {source!r} ({FIELD}): {e}") from e
  return _checked(spec, _from_pytorch(spec, source, weight_file))


def _from_pytorch(spec: BackboneSpec, source: str, weight_file: Optional[str]) -> Dict[str, Any]:
  """PyTorch weights (model.safetensors, or pytorch_model.bin with PyTorch) converted by
  transformers, unexpected keys kept (transformers' own loading would drop them and leave the
  arrays it could not place randomly initialized: `_checked` names them instead)."""
  from transformers import modeling_flax_pytorch_utils  # pylint: disable=g-import-not-at-top
  from transformers.utils import cached_file  # pylint: disable=g-import-not-at-top
  if weight_file is not None:
    path = os.path.join(os.path.expanduser(source), weight_file)
  else:
    path = None
    for name in hf_weights.WEIGHT_FILES[1:]:
      path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
      if path:
        break
    if not path:
      raise FileNotFoundError(f"{FIELD}={source!r}: the repository has none of "
                              f"{list(hf_weights.WEIGHT_FILES)}")
  model = spec.model_class(spec.hf_config, seed=0)        # the converter reads its shapes
  converted = modeling_flax_pytorch_utils.load_pytorch_checkpoint_in_flax_state_dict(
      model, path, is_sharded=False)
  converted = jax.tree.map(np.asarray, dict(converted))
  return converted if "params" in converted else {"params": converted}


def _checked(spec: BackboneSpec, variables: Dict[str, Any]) -> Dict[str, Any]:
  size = spec.image_size or 64
  variables_template = jax.eval_shape(lambda: spec.module(jnp.float32).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), deterministic=True))
  template = traverse_util.flatten_dict(variables_template)
  given = traverse_util.flatten_dict(variables)
  for key in [k for k in given if k not in template]:
    # transformers 4.57 names a basic ResNet block's layers "layer_<i>" in Flax but converts
    # PyTorch's "layer.<i>" to "<i>", and, not finding them, a norm's weight to "kernel"
    # (unchanged, a 1-D array): put them where the model has them.
    moved = tuple(f"layer_{p}" if p.isdigit() and i > 0 and key[i - 1] == "layer" else p
                  for i, p in enumerate(key))
    if moved[-1] == "kernel" and np.ndim(given[key]) == 1:
      moved = moved[:-1] + ("scale",)
    if moved != key and moved in template and moved not in given:
      given[moved] = given.pop(key)
  tops = {k[:2] for k in template}
  heads = sorted("/".join(k) for k in given if k not in template and k[:2] not in tops)
  if heads:
    logging.info("%s: left out what the backbone does not use (a head): %s", spec.source,
                 ", ".join(heads[:5]) + (" ..." if len(heads) > 5 else ""))
  given = {k: v for k, v in given.items() if k in template or k[:2] in tops}
  fitted, report = surgery.fit(traverse_util.unflatten_dict(given), variables_template)
  report.check(f"the checkpoint of {FIELD}={spec.source!r} (transformers' {spec.family} model)")
  return fitted


def features(spec: BackboneSpec, variables: Dict[str, Any], images: jax.Array, *,
             dtype: Any = jnp.float32, train: bool = False,
             dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """Pooled features [B, D] of ImageNet-normalized NHWC `images`."""
  images = augment.renormalize(images, (augment.IMAGENET_MEAN, augment.IMAGENET_STD),
                               (spec.mean, spec.std))
  applied = {"params": variables["params"]}
  if "batch_stats" in variables:
    applied["batch_stats"] = jax.lax.stop_gradient(variables["batch_stats"])
  # transformers ties BatchNorm's mode to `deterministic` with dropout's: a backbone with
  # BatchNorm (ResNet, RegNet: no dropout) runs deterministic, its statistics frozen.
  deterministic = not train or "batch_stats" in variables
  rngs = {"dropout": dropout_rng} if not deterministic and dropout_rng is not None else {}
  out = spec.module(dtype).apply(applied, images.astype(dtype), deterministic=deterministic,
                                 rngs=rngs)
  if spec.family in CLS_FAMILIES:
    return out.last_hidden_state[:, 0]
  return out.pooler_output.reshape(images.shape[0], -1)


class BackboneClassifier(nn.Module):
  """`apply(params, images, train=...)` -> `(logits, {"features"})`, as `Classifier`: the
  backbone's variables are one parameter, "backbone", and the head is "head"."""
  num_classes: int
  source: str
  image_size: int = 224
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    spec = backbone_spec(self.source)
    size = self.image_size
    variables = self.param("backbone", lambda rng: nn.unbox(spec.module(self.dtype).init(
        {"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 3), self.dtype),
        deterministic=True)))
    feats = features(spec, variables, images, dtype=self.dtype, train=train,
                     dropout_rng=self.make_rng("dropout") if train else None)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=classifier.head_init(2e-5))(feats)
    return logits.astype(jnp.float32), {"features": feats}

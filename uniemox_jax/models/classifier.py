"""Downstream classifier (docs/method.md §5): encoder, pool, Dense head.

pool="avg" (the method's, and MAE's fine-tuning with global pooling): the average of the patch
tokens, then `fc_norm`; the encoder's final norm is replaced by it, so a pretrained
`encoder/norm` is deliberately not loaded. pool="token" (timm's default ViTs): the encoder's
final norm, then the CLS token, no `fc_norm`: how an imported timm classifier was trained.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from uniemox_jax.models import vit


POOLS = ("avg", "token")
# The std of a standard normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


def head_init(std: float):
  """Truncated normal (at 2 std) whose actual std is `std`. timm's trunc_normal_(std=2e-5),
  used by the reference, truncates at +-2 absolute, i.e. never: a plain normal of that std."""
  return nn.initializers.truncated_normal(std / _TRUNCATED_STD)


class Classifier(nn.Module):
  """`apply(params, images, train=...)` -> `(logits [B, num_classes], aux)`; aux holds the
  pooled, normalized features ("features") that linear probes read."""
  num_classes: int
  variant: str = "B/16"
  image_size: int = 224
  drop_path: float = 0.0
  pos_embed: str = "sincos"
  remat: "str | bool" = "none"
  scan: bool = False
  dtype: vit.Dtype = jnp.float32
  param_dtype: vit.Dtype = jnp.float32
  attention: str = "auto"
  attention_pad: int = 0
  pool: str = "avg"

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f"config.model.pool={self.pool!r}: choose one of {POOLS}")
    tokens, _ = vit.Encoder(self.variant, self.image_size, self.drop_path,
                            final_norm=self.pool == "token",
                            pos_embed=self.pos_embed, remat=self.remat, scan=self.scan,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            attention=self.attention, attention_pad=self.attention_pad,
                            name="encoder")(images, train=train)
    if self.pool == "token":
      features = tokens[:, 0]
    else:
      features = vit.layer_norm("fc_norm", self.dtype, self.param_dtype)(
          jnp.mean(tokens[:, 1:], axis=1))
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
        kernel_init=nn.with_logical_partitioning(
            head_init(2e-5), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(features)
    return logits.astype(jnp.float32), {"features": features}


# Parameters of a pretrained encoder that a classifier does not use, by design.
EXPECTED_UNUSED = ("norm/scale", "norm/bias")
# Classifier encoder parameters a pretrained encoder may lack, by design: a learned position
# table starts from the fixed sin-cos one that pretraining used.
EXPECTED_NEW = ("encoder/pos_embed",)


@dataclasses.dataclass
class LoadReport:
  loaded: List[str]
  unused_expected: List[str]    # in the source, dropped on purpose (the encoder's final norm)
  kept_from_init: List[str]     # in the target only: the new head and fc_norm
  problems: List[str]           # missing, unexpected or mis-shaped: loading fails on these

  def summary(self) -> str:
    return (f"loaded {len(self.loaded)} encoder arrays; dropped as expected: "
            f"{self.unused_expected or 'none'}; newly initialized: {self.kept_from_init}")


def load_encoder_params(classifier_params: Mapping[str, Any],
                        pretrained_encoder: Mapping[str, Any],
                        ) -> Tuple[Dict[str, Any], LoadReport]:
  """Copies a pretrained encoder (the `encoder` subtree of UniEmoX params) into classifier
  params. Every key is accounted for: a missing, unexpected or mis-shaped array raises a
  ValueError that names it; the encoder's final norm is listed as dropped on purpose."""
  target = traverse_util.flatten_dict(dict(classifier_params), sep="/")
  source = traverse_util.flatten_dict(dict(pretrained_encoder), sep="/")
  report = LoadReport([], [], sorted(k for k in target if not k.startswith("encoder/")), [])
  for key, value in source.items():
    full = "encoder/" + key
    if full not in target:
      if key in EXPECTED_UNUSED:
        report.unused_expected.append(full)
      else:
        report.problems.append(f"unexpected pretrained array {full}")
    elif tuple(target[full].shape) != tuple(value.shape):
      report.problems.append(f"{full}: pretrained shape {tuple(value.shape)} != model shape "
                             f"{tuple(target[full].shape)}")
    else:
      target[full] = jnp.asarray(value, target[full].dtype)
      report.loaded.append(full)
  for k in target:
    if k.startswith("encoder/") and k[len("encoder/"):] not in source:
      if k in EXPECTED_NEW:
        report.kept_from_init.append(k)
      else:
        report.problems.append(f"missing pretrained array {k}")
  if report.problems:
    raise ValueError("Pretrained encoder does not fit the classifier:\n  "
                     + "\n  ".join(report.problems))
  return traverse_util.unflatten_dict(target, sep="/"), report

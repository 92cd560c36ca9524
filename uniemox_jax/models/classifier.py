"""Downstream classifier (docs/method.md §5): encoder, pool, Dense head.

pool="avg" (the method's, and MAE's fine-tuning with global pooling): the average of the patch
tokens, then `fc_norm`; the encoder's final norm is replaced by it, so a pretrained
`encoder/norm` is deliberately not loaded. pool="token" (timm's default ViTs): the encoder's
final norm, then the CLS token, no `fc_norm`: how an imported timm classifier was trained.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from uniemox_jax.models import surgery
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
  pos_embed: str = "sincos"
  pool: str = "avg"
  student: vit.StudentConfig = vit.StudentConfig()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f"config.model.pool={self.pool!r}: choose one of {POOLS}")
    c = self.student
    tokens, _ = vit.Encoder(self.variant, self.image_size, final_norm=self.pool == "token",
                            pos_embed=self.pos_embed, student=c,
                            name="encoder")(images, train=train)
    if self.pool == "token":
      features = tokens[:, 0]
    else:
      features = vit.layer_norm("fc_norm", c.dtype, c.param_dtype)(
          jnp.mean(tokens[:, 1:], axis=1))
    logits = nn.Dense(
        self.num_classes, dtype=c.dtype, param_dtype=c.param_dtype, name="head",
        kernel_init=nn.with_logical_partitioning(
            head_init(2e-5), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(features)
    return logits.astype(jnp.float32), {"features": features}


# Parameters of a pretrained encoder that a classifier does not use, by design.
EXPECTED_UNUSED = ("norm/scale", "norm/bias")
# Classifier encoder parameters a pretrained encoder may lack, by design: a learned position
# table starts from the fixed sin-cos one that pretraining used.
EXPECTED_NEW = ("pos_embed",)


def load_encoder_params(classifier_params: Mapping[str, Any],
                        pretrained_encoder: Mapping[str, Any]
                        ) -> Tuple[Dict[str, Any], surgery.Fit]:
  """Copies a pretrained encoder (the `encoder` subtree of UniEmoX params) into classifier
  params (`surgery.fit`): every key is accounted for; the encoder's final norm is dropped on
  purpose, the head and fc_norm keep their initialization; anything missing, unexpected or
  mis-shaped raises, naming it."""
  encoder, report = surgery.fit(pretrained_encoder, classifier_params["encoder"],
                                drop=EXPECTED_UNUSED, keep=EXPECTED_NEW, prefix="encoder/",
                                source_name="pretrained")
  report.kept += sorted(k for k in traverse_util.flatten_dict(dict(classifier_params), sep="/")
                        if not k.startswith("encoder/"))
  report.check("the pretrained encoder")
  return dict(classifier_params, encoder=encoder), report

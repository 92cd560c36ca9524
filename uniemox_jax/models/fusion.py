"""Fusion of the scene token alpha and the person token beta into gamma (docs/method.md §1).

Every fusion maps (alpha [B, D], beta [B, D]) -> gamma [B, D] and is chosen by name from the
config (`config.model.fusion`) through `get_fusion`. "easy" is the paper's default; the others
are the ablation variants.
"""
from __future__ import annotations

from typing import Dict, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniemox_jax.models import vit

_XAVIER = nn.initializers.xavier_uniform()


def _dense(features: int, name: str, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_XAVIER, (None, None)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


# The reference's easy fusion is torch's nn.LayerNorm with its default epsilon, not the ViT's
# 1e-6: imported fusion weights then give the same gamma.
EASY_LN_EPS = 1e-5


def _ln(name: str, dtype, param_dtype, epsilon: float = vit.LN_EPS) -> nn.LayerNorm:
  return vit.layer_norm(name, dtype, param_dtype, axis=None, epsilon=epsilon)


class _Fusion(nn.Module):
  dtype: vit.Dtype = jnp.float32
  param_dtype: vit.Dtype = jnp.float32
  heads: int = 8  # used by the multi-head variants


class EasyFusion(_Fusion):
  """ELU(Dense(LN(alpha) + LN(beta))), one LayerNorm shared by both tokens."""

  @nn.compact
  def __call__(self, alpha, beta):
    norm = _ln("norm", self.dtype, self.param_dtype, EASY_LN_EPS)
    return nn.elu(_dense(alpha.shape[-1], "proj", self.dtype, self.param_dtype)(
        norm(alpha) + norm(beta)))


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
  if x.shape[-1] % heads:
    raise ValueError(f"fusion width {x.shape[-1]} is not divisible by {heads} heads")
  return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


class WeightedSumFusion(_Fusion):
  """LN(concat_h(a_h * alpha_h + b_h * beta_h)) with learned per-head weights (start at 0.5)."""

  @nn.compact
  def __call__(self, alpha, beta):
    init = nn.with_logical_partitioning(nn.initializers.constant(0.5), (None,))
    a = self.param("alpha_weight", init, (self.heads,), self.param_dtype)
    b = self.param("beta_weight", init, (self.heads,), self.param_dtype)
    mixed = (a[None, :, None] * _split_heads(alpha, self.heads)
             + b[None, :, None] * _split_heads(beta, self.heads))
    return _ln("norm", self.dtype, self.param_dtype)(mixed.reshape(alpha.shape))


class AttentionFusion(_Fusion):
  """Per head, a learned query attends over the two tokens; the softmax weights mix their
  value projections; a Dense merges the heads and a LayerNorm closes."""

  @nn.compact
  def __call__(self, alpha, beta):
    width = alpha.shape[-1]
    tokens = jnp.stack([alpha, beta], axis=1)                          # [B, 2, D]
    keys = _split_heads(_dense(width, "key", self.dtype, self.param_dtype)(tokens), self.heads)
    values = _split_heads(_dense(width, "value", self.dtype, self.param_dtype)(tokens),
                          self.heads)                                  # [B, 2, H, d]
    query = self.param("query", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None)), keys.shape[-2:], self.param_dtype)
    scores = jnp.einsum("bthd,hd->bth", keys, query.astype(keys.dtype)) / jnp.sqrt(
        jnp.asarray(keys.shape[-1], keys.dtype))
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=1).astype(values.dtype)
    mixed = jnp.einsum("bth,bthd->bhd", weights, values).reshape(alpha.shape)
    return _ln("norm", self.dtype, self.param_dtype)(
        _dense(width, "out", self.dtype, self.param_dtype)(mixed))


class GluFusion(_Fusion):
  """MLP with GLU gating over the concatenated tokens: Dense(sigmoid(Wg x) * (Wv x))."""
  hidden_ratio: int = 2

  @nn.compact
  def __call__(self, alpha, beta):
    width = alpha.shape[-1]
    x = jnp.concatenate([alpha, beta], axis=-1)
    hidden = width * self.hidden_ratio
    gate = nn.sigmoid(_dense(hidden, "gate", self.dtype, self.param_dtype)(x))
    value = _dense(hidden, "value", self.dtype, self.param_dtype)(x)
    return _dense(width, "out", self.dtype, self.param_dtype)(gate * value)


class PriorFusion(_Fusion):
  """The paper figure's psychological-prior form: Dense(alpha * lambda + beta), where
  lambda = sigmoid(Dense(alpha)) is a gate computed from the scene token."""

  @nn.compact
  def __call__(self, alpha, beta):
    width = alpha.shape[-1]
    gate = nn.sigmoid(_dense(width, "gate", self.dtype, self.param_dtype)(alpha))
    return _dense(width, "proj", self.dtype, self.param_dtype)(alpha * gate + beta)


class NoFusion(_Fusion):
  """Fusion off: the scene token alone is distilled (gamma = alpha)."""

  def __call__(self, alpha, beta):
    del beta
    return alpha


FUSIONS: Dict[str, Type[_Fusion]] = {
    "easy": EasyFusion,
    "weighted_sum": WeightedSumFusion,
    "attention": AttentionFusion,
    "glu": GluFusion,
    "prior": PriorFusion,
    "none": NoFusion,
}


def get_fusion(name: str) -> Type[_Fusion]:
  try:
    return FUSIONS[name]
  except KeyError:
    raise ValueError(f"config.model.fusion={name!r} is not a fusion; choose one of "
                     f"{sorted(FUSIONS)}") from None

"""The one table of names between PyTorch ViT state dicts (timm's, MAE's, the authors') and this
codebase's parameters: `torch_import` reads it one way, `torch_export` the other, so the two
are inverses by construction.

A `Key` pairs a state-dict key with a path in our tree and the two array conversions (a
PyTorch Linear's weight is our Dense kernel transposed; qkv and the attention's output
projection carry the heads as an axis of their own here). Position tables are not in the table:
whether one is MAE's fixed sin-cos table or a learned one is decided by each side.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Path = Tuple[str, ...]


def _same(a: np.ndarray) -> np.ndarray:
  return a


@dataclasses.dataclass(frozen=True)
class Key:
  torch: str
  ours: Path
  to_ours: Callable[[np.ndarray], np.ndarray] = _same
  to_torch: Callable[[np.ndarray], np.ndarray] = _same


def linear(torch: str, ours: Path) -> List[Key]:
  return [Key(f"{torch}.weight", ours + ("kernel",), np.transpose, np.transpose),
          Key(f"{torch}.bias", ours + ("bias",))]


def norm(torch: str, ours: Path) -> List[Key]:
  return [Key(f"{torch}.weight", ours + ("scale",)), Key(f"{torch}.bias", ours + ("bias",))]


def blocks(torch: str, ours: Path, depth: int, heads: int) -> List[Key]:
  """timm's `Block`s `{torch}.{i}` as our `block_{i}` (qkv kernel [width, 3, heads, d], output
  projection [heads, d, width])."""
  keys = []
  for i in range(depth):
    t, o = f"{torch}.{i}", ours + (f"block_{i}",)
    keys += norm(f"{t}.norm1", o + ("norm1",)) + [
        Key(f"{t}.attn.qkv.weight", o + ("attn", "qkv", "kernel"),
            lambda w: w.T.reshape(w.shape[1], 3, heads, -1),
            lambda k: k.reshape(k.shape[0], -1).T),
        Key(f"{t}.attn.qkv.bias", o + ("attn", "qkv", "bias"),
            lambda b: b.reshape(3, heads, -1), lambda b: b.reshape(-1)),
        Key(f"{t}.attn.proj.weight", o + ("attn", "proj", "kernel"),
            lambda w: w.T.reshape(heads, -1, w.shape[0]),
            lambda k: k.reshape(-1, k.shape[-1]).T),
        Key(f"{t}.attn.proj.bias", o + ("attn", "proj", "bias"))]
    keys += (norm(f"{t}.norm2", o + ("norm2",)) + linear(f"{t}.mlp.fc1", o + ("mlp", "fc1"))
             + linear(f"{t}.mlp.fc2", o + ("mlp", "fc2")))
  return keys


def encoder(depth: int, heads: int) -> List[Key]:
  """The encoder without its position table: patch embedding, CLS token, blocks, final norm."""
  enc = ("encoder",)
  return ([Key("patch_embed.proj.weight", enc + ("patch_embed", "proj", "kernel"),
               lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
           Key("patch_embed.proj.bias", enc + ("patch_embed", "proj", "bias")),
           Key("cls_token", enc + ("cls_token",))]
          + blocks("blocks", enc + ("transformer",), depth, heads) + norm("norm", enc + ("norm",)))


def decoder(depth: int, heads: int) -> List[Key]:
  """MAE's decoder without its (fixed) position table; decoder_embed is also UniEmoX's student
  projection."""
  dec = ("decoder",)
  return (linear("decoder_embed", dec + ("embed",)) + [Key("mask_token", dec + ("mask_token",))]
          + blocks("decoder_blocks", dec + ("transformer",), depth, heads)
          + norm("decoder_norm", dec + ("norm",)) + linear("decoder_pred", dec + ("pred",)))


def head() -> List[Key]:
  """A classifier's pooled-feature norm (MAE's fc_norm) and head."""
  return norm("fc_norm", ("fc_norm",)) + linear("head", ("head",))


def fusion(prefix: str = "") -> List[Key]:
  """The authors' AttentionFusion (models/attention_fusion.py): `bn` (a LayerNorm), `linear`."""
  return norm(f"{prefix}bn", ("fuse", "norm")) + linear(f"{prefix}linear", ("fuse", "proj"))


def read(sd: Mapping[str, np.ndarray], keys: Sequence[Key]) -> Tuple[Dict[str, Any], List[str]]:
  """(our tree of the keys `sd` has, the state-dict keys used)."""
  params: Dict[str, Any] = {}
  used = []
  for k in keys:
    if k.torch in sd:
      node = params
      for name in k.ours[:-1]:
        node = node.setdefault(name, {})
      node[k.ours[-1]] = k.to_ours(sd[k.torch])
      used.append(k.torch)
  return params, used


def get(params: Mapping[str, Any], path: Path) -> Optional[Any]:
  for name in path:
    if not isinstance(params, Mapping) or name not in params:
      return None
    params = params[name]
  return params


def write(params: Mapping[str, Any], keys: Sequence[Key]) -> Dict[str, np.ndarray]:
  """The state dict of the keys whose arrays `params` has."""
  return {k.torch: k.to_torch(a) for k in keys if (a := get(params, k.ours)) is not None}

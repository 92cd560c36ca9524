"""CLIP's image tower as one fused Flax module: the teacher's hot path on accelerators.

transformers' Flax CLIP (4.x, frozen) computes q, k and v as three matmuls, attends without a
fused kernel, and runs its last block on every token although only the CLS token leaves the
tower. This module computes the same function with one qkv matmul, the attention kernel of
`uniemox_jax.models.attention` (cuDNN flash attention on NVIDIA GPUs) and a last block whose
attention and MLP run on the CLS token alone. Its weights are the ones transformers loads
(hub ids, local folders, PyTorch-only folders), rearranged once by `from_transformers`; a
test holds its embeddings equal to `FlaxCLIPModel.get_image_features`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax.models import attention as attention_lib
from uniemox_jax.models import surgery


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The numbers of a CLIP vision tower and its projection."""
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  patch: int = 16
  image_size: int = 224
  embed_dim: int = 512
  eps: float = 1e-5
  act: str = "quick_gelu"

  @classmethod
  def from_clip_config(cls, config: Any) -> "VisionConfig":
    """From a transformers `CLIPConfig` (or its dict form, as in config.json)."""
    if not isinstance(config, Mapping):
      config = config.to_dict()
    vision = config["vision_config"]
    return cls(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
               heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
               patch=vision["patch_size"], image_size=vision["image_size"],
               embed_dim=config["projection_dim"], eps=vision.get("layer_norm_eps", 1e-5),
               act=vision.get("hidden_act", "quick_gelu"))


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: nn.gelu(x, approximate=False)
  raise ValueError(f"CLIP vision hidden_act {name!r} is not supported (quick_gelu, gelu)")


class _Block(nn.Module):
  """Pre-norm CLIP block. With `cls_only`, queries, output projection and MLP run on the
  first token only (keys and values still see every token)."""
  config: VisionConfig
  cls_only: bool = False
  dtype: Any = jnp.float32
  attention: str = "auto"
  attention_pad: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    head_dim = c.width // c.heads
    ln = lambda name: nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name=name)  # noqa: E731
    y = ln("norm1")(x)
    qkv_kernel = self.param("qkv_kernel", nn.initializers.normal(0.01),
                            (c.width, 3, c.heads, head_dim))
    qkv_bias = self.param("qkv_bias", nn.initializers.zeros, (3, c.heads, head_dim))
    qkv_kernel, qkv_bias = qkv_kernel.astype(self.dtype), qkv_bias.astype(self.dtype)

    def project(inputs, kernel, bias):   # one plain [B*T, D] x [D, n*H*hd] matmul
      out = inputs @ kernel.reshape(c.width, -1) + bias.reshape(1, 1, -1)
      return out.reshape(inputs.shape[:2] + kernel.shape[1:])
    if self.cls_only:
      kv = project(y, qkv_kernel[:, 1:], qkv_bias[1:])
      q = project(y[:, :1], qkv_kernel[:, :1], qkv_bias[:1])[:, :, 0]
      k, v = kv[:, :, 0], kv[:, :, 1]
      x = x[:, :1]
    else:
      qkv = project(y, qkv_kernel, qkv_bias)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention_lib.dot_product_attention(q, k, v, implementation=self.attention,
                                              pad_to=self.attention_pad or None)
    x = x + nn.DenseGeneral(c.width, axis=(-2, -1), dtype=self.dtype, name="proj")(out)
    y = ln("norm2")(x)
    y = nn.Dense(c.mlp_dim, dtype=self.dtype, name="fc1")(y)
    y = nn.Dense(c.width, dtype=self.dtype, name="fc2")(_activation(c.act)(y))
    return x + y


class _ScanBlock(_Block):
  """`_Block` with nn.scan's (carry, per-layer input) -> (carry, output) signature."""

  @nn.compact
  def __call__(self, x, _):  # pytype: disable=signature-mismatch
    return super().__call__(x), None


class ClipVisionTower(nn.Module):
  """CLIP-normalized [B, H, W, 3] pixels -> [B, embed_dim] image features (not normalized),
  equal to transformers' `get_image_features`.

  With `scan`, every block but the last (the CLS-only one) runs as one `nn.scan` named
  "blocks", its parameters stacked on a leading axis (`scan_layout`): one block to compile
  instead of depth - 1."""
  config: VisionConfig = VisionConfig()
  dtype: Any = jnp.float32
  attention: str = "auto"
  attention_pad: int = 0
  scan: bool = False

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    if pixels.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"the CLIP tower expects [B, {c.image_size}, {c.image_size}, 3] pixels, "
                       f"got {pixels.shape}")
    x = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID",
                use_bias=False, dtype=self.dtype, name="patch_embed")(pixels)
    x = x.reshape(x.shape[0], -1, c.width)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.width,))
    pos = self.param("position_embedding", nn.initializers.normal(0.02),
                     (x.shape[1] + 1, c.width))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)[None]
    x = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="pre_norm")(x)
    kwargs = dict(dtype=self.dtype, attention=self.attention, attention_pad=self.attention_pad)
    if self.scan:
      stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=c.depth - 1)
      x, _ = stack(c, name="blocks", **kwargs)(x, None)
    else:
      for i in range(c.depth - 1):
        x = _Block(c, name=f"block_{i}", **kwargs)(x)
    x = _Block(c, cls_only=True, name=f"block_{c.depth - 1}", **kwargs)(x)
    pooled = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="post_norm")(x[:, 0])
    return nn.Dense(c.embed_dim, use_bias=False, dtype=self.dtype, name="projection")(pooled)


def from_transformers(params: Mapping[str, Any], config: VisionConfig) -> dict:
  """The tower's parameters from a `FlaxCLIPModel` parameter tree (its "vision_model" and
  "visual_projection"), as NumPy arrays; q, k and v are stacked into one kernel."""
  vision = params["vision_model"]
  emb = vision["embeddings"]
  head_dim = config.width // config.heads
  out = {
      "patch_embed": {"kernel": np.asarray(emb["patch_embedding"]["kernel"])},
      "class_embedding": np.asarray(emb["class_embedding"]),
      "position_embedding": np.asarray(emb["position_embedding"]["embedding"]),
      "pre_norm": _norm(vision["pre_layrnorm"]),
      "post_norm": _norm(vision["post_layernorm"]),
      "projection": {"kernel": np.asarray(params["visual_projection"]["kernel"])},
  }
  layers = vision["encoder"]["layers"]
  if len(layers) != config.depth:
    raise ValueError(f"the CLIP weights hold {len(layers)} vision layers, the config "
                     f"{config.depth}")
  for i in range(config.depth):
    layer = layers[str(i)]
    attn = layer["self_attn"]
    kernels = [np.asarray(attn[f"{n}_proj"]["kernel"]).reshape(config.width, config.heads,
                                                               head_dim) for n in "qkv"]
    biases = [np.asarray(attn[f"{n}_proj"]["bias"]).reshape(config.heads, head_dim)
              for n in "qkv"]
    out[f"block_{i}"] = {
        "norm1": _norm(layer["layer_norm1"]),
        "qkv_kernel": np.stack(kernels, axis=1),
        "qkv_bias": np.stack(biases, axis=0),
        "proj": {"kernel": np.asarray(attn["out_proj"]["kernel"]).reshape(
            config.heads, head_dim, config.width),
                 "bias": np.asarray(attn["out_proj"]["bias"])},
        "norm2": _norm(layer["layer_norm2"]),
        "fc1": {k: np.asarray(v) for k, v in layer["mlp"]["fc1"].items()},
        "fc2": {k: np.asarray(v) for k, v in layer["mlp"]["fc2"].items()},
    }
  return out


def scan_layout(params: Mapping[str, Any], depth: int) -> dict:
  """The tower's parameters in the scanned layout: block_0 .. block_{depth-2} stacked into
  "blocks"; a tree already in that layout is returned as it is."""
  if "blocks" in params:
    return dict(params)
  scanned = {f"block_{i}": params[f"block_{i}"] for i in range(depth - 1)}
  out = {k: v for k, v in params.items() if k not in scanned}
  return dict(out, **surgery.stack_blocks(scanned))


def _norm(tree: Mapping[str, Any]) -> dict:
  return {"scale": np.asarray(tree["scale"]), "bias": np.asarray(tree["bias"])}

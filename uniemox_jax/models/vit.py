"""ViT building blocks and the MAE-style ViT encoder.

Every parameter and the main activations carry logical axis names ("embed", "mlp", "heads",
"kv", "batch", "layers"); `uniemox_jax.sharding` maps them onto the mesh axes. Parameters are
float32 (`param_dtype`), compute runs in `dtype` (bfloat16 in the paper recipes).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax.models import attention as attention_lib

Dtype = Any

LN_EPS = 1e-6

# width, depth, heads, mlp_dim. "mu" is a micro size for tests and the CPU demo.
VIT_SIZES = {
    "mu": (64, 2, 2, 128),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  """How the student's transformer stacks compute, one record for every module of the student
  (encoder, decoder, UniEmoX, classifier), built once from `config.model`
  (`uniemox_jax.models.student_config`, which checks each field)."""
  drop_path: float = 0.0              # the deepest block's stochastic-depth rate
  remat: "str | bool" = "none"        # a policy of BLOCK_REMAT_POLICIES
  scan: bool = False                  # blocks as one nn.scan (parameters gain a layers axis)
  dtype: Dtype = jnp.float32          # compute
  param_dtype: Dtype = jnp.float32
  attention: str = "auto"             # the kernel (models/attention.py)
  attention_pad: int = 0              # cuDNN's sequence multiple; 0: the kernel's default


@dataclasses.dataclass(frozen=True)
class VitShape:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int


def decode_variant(variant: str) -> VitShape:
  """The one place that turns "L/16" (size/patch) into layer sizes."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not match or match.group(1) not in VIT_SIZES:
    raise ValueError(f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size in "
                     f"{sorted(VIT_SIZES)}, for example 'L/16'.")
  width, depth, heads, mlp_dim = VIT_SIZES[match.group(1)]
  return VitShape(width, depth, heads, mlp_dim, int(match.group(2)))


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[len(positions), dim] sin-cos embedding, sin half first (MAE's layout)."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
  """Fixed 2-D position embedding, identical to MAE's `get_2d_sincos_pos_embed`.

  The first half of the channels encodes the column index, the second half the row index, so
  that the table of an official MAE checkpoint and ours agree value for value. With
  `cls_token`, a zero row is prepended for the CLS position.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def dense_init():
  # MAE and timm initialize every Linear with xavier-uniform and a zero bias.
  return nn.initializers.xavier_uniform()


def layer_norm(name: Optional[str], dtype: Dtype, param_dtype: Dtype,
               axis: str = "embed", epsilon: float = LN_EPS) -> nn.LayerNorm:
  """LayerNorm with the ViT epsilon (1e-6 unless given) and logically named parameters."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)))


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per sample.

  The rate may be a traced scalar, so one scanned block can carry a per-layer rate.
  """

  @nn.compact
  def __call__(self, x: jax.Array, rate, deterministic: bool) -> jax.Array:
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    draw = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(draw, x / keep.astype(x.dtype), jnp.zeros_like(x))


# Rematerialization of transformer blocks, by name (config.model.remat). A policy names what
# the backward pass may keep from the forward one; everything else is recomputed.
BLOCK_REMAT_POLICIES = {
    "none": None,                                              # keep everything: no remat
    "full": jax.checkpoint_policies.nothing_saveable,          # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,             # keep matmul outputs
    # keep the weight matmuls, recompute attention's batched ones and the elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_remat(policy: "str | bool") -> str:
  """A block policy name; True/False (older configs) mean "full"/"none"."""
  if isinstance(policy, bool):
    return "full" if policy else "none"
  if policy not in BLOCK_REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r}: choose one of {sorted(BLOCK_REMAT_POLICIES)}")
  return policy


class Projection(nn.Module):
  """A linear map of the last `in_dims` input axes onto `features` axes, kernel stored
  unflattened ([*in, *features]) with logical axis names, xavier-uniform over the flattened
  fans as torch's nn.Linear sees them, bias zero. (Flax's DenseGeneral initializes the
  flattened kernel through its own wrapper, which clashes with logical-axis constraints on the
  kernel once the axis rules are in scope.)"""
  features: Tuple[int, ...]
  in_dims: int
  kernel_axes: Tuple[Optional[str], ...]
  bias_axes: Tuple[Optional[str], ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_dims:]

    def init(key, shape, dtype=jnp.float32):
      flat = (int(np.prod(in_shape)), int(np.prod(self.features)))
      return dense_init()(key, flat, dtype).reshape(shape)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           self.bias_axes),
                      tuple(self.features), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (bias on, as in MAE/timm).

  `implementation` picks the kernel ("auto": cuDNN flash attention on NVIDIA GPUs in
  bf16/fp16, XLA elsewhere); `pad_to` the sequence multiple cuDNN sees (0: its default).
  """
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "auto"
  pad_to: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by {self.heads} heads")
    head_dim = width // self.heads
    qkv = Projection((3, self.heads, head_dim), 1, ("embed", None, "heads", "kv"),
                     (None, "heads", "kv"), self.dtype, self.param_dtype, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention_lib.dot_product_attention(q, k, v, implementation=self.implementation,
                                              pad_to=self.pad_to or None)
    return Projection((width,), 2, ("heads", "kv", "embed"), ("embed",), self.dtype,
                      self.param_dtype, name="proj")(out)


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(dense_init(), ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                 name="fc1")(x)
    # torch.nn.GELU (MAE/timm) is the exact erf form, not the tanh approximation.
    x = nn.gelu(x, approximate=False)
    x = nn.with_logical_constraint(x, ("batch", None, "mlp"))
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(dense_init(), ("mlp", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                    name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x)))."""
  heads: int
  mlp_dim: int
  student: StudentConfig = StudentConfig()

  @nn.compact
  def __call__(self, x: jax.Array, drop_path_rate, deterministic: bool) -> jax.Array:
    c = self.student
    x = nn.with_logical_constraint(x, ("batch", None, None))
    y = layer_norm("norm1", c.dtype, c.param_dtype)(x)
    y = Attention(self.heads, c.dtype, c.param_dtype, c.attention, c.attention_pad,
                  name="attn")(y)
    x = x + DropPath(name="drop_path1")(y, drop_path_rate, deterministic)
    y = layer_norm("norm2", c.dtype, c.param_dtype)(x)
    y = Mlp(self.mlp_dim, c.dtype, c.param_dtype, name="mlp")(y)
    return x + DropPath(name="drop_path2")(y, drop_path_rate, deterministic)


class _ScanBlock(Block):
  """`Block` with the (carry, per-layer input) -> (carry, output) signature of nn.scan."""

  @nn.compact
  def __call__(self, x, drop_path_rate, deterministic):  # pytype: disable=signature-mismatch
    return super().__call__(x, drop_path_rate, deterministic), None


class Transformer(nn.Module):
  """A stack of `depth` blocks, unrolled or as one `nn.scan`, rematerialized by a policy
  of `BLOCK_REMAT_POLICIES`.

  Unrolled blocks are named `block_{i}`; scanned ones share the name `blocks` with a leading
  "layers" axis on every parameter.
  """
  depth: int
  heads: int
  mlp_dim: int
  student: StudentConfig = StudentConfig()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    c = self.student
    # Stochastic depth grows linearly with depth, as in MAE/timm.
    rates = np.linspace(0.0, c.drop_path, self.depth)
    # Without drop path no block needs a "dropout" key, even in training.
    deterministic = deterministic or c.drop_path == 0.0
    policy = block_remat(c.remat)
    args = (self.heads, self.mlp_dim, c)
    if c.scan:
      block = _ScanBlock
      if policy != "none":
        block = nn.remat(block, prevent_cse=False, static_argnums=(3,),
                         policy=BLOCK_REMAT_POLICIES[policy])
      stack = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(*args, name="blocks")(x, jnp.asarray(rates, jnp.float32), deterministic)
      return x
    block = Block
    if policy != "none":
      block = nn.remat(Block, static_argnums=(2, 3), policy=BLOCK_REMAT_POLICIES[policy])
    for i in range(self.depth):
      x = block(*args, name=f"block_{i}")(x, float(rates[i]), deterministic)
    return x


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection (a strided conv, as in MAE), [B,H,W,C] -> [B,N,D]."""
  patch: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    # MAE initializes the patch projection like a Linear (xavier over the flattened kernel).
    def init(key, shape, dtype):
      flat = nn.initializers.xavier_uniform()(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
      return flat.reshape(shape)
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(init, (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                name="proj")(images)
    batch, gh, gw, width = x.shape
    return x.reshape(batch, gh * gw, width)


def grid_size(image_size: int, patch: int) -> int:
  if image_size % patch:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
  return image_size // patch


class Encoder(nn.Module):
  """MAE ViT encoder: patches + fixed sin-cos positions, optional masking, CLS, blocks, norm.

  `__call__(images, ids_keep=None)` returns `(tokens, aux)`: tokens is [B, 1 + kept, D] with the
  CLS token first; aux holds "cls" (the CLS token after the final norm) and "pre_norm" (all
  tokens before it). With `ids_keep` [B, K], only those patches enter the transformer (MAE's
  random masking, see `uniemox_jax.models.masking`).
  """
  variant: str = "B/16"
  image_size: int = 224
  final_norm: bool = True
  # "sincos": MAE's fixed table (pretraining). "learned": a parameter `pos_embed` [1, 1 + N, D]
  # initialized to that table (CLS row zero), as MAE fine-tuning and timm ViTs train it.
  pos_embed: str = "sincos"
  student: StudentConfig = StudentConfig()

  @property
  def shape(self) -> VitShape:
    return decode_variant(self.variant)

  @property
  def num_patches(self) -> int:
    return grid_size(self.image_size, self.shape.patch) ** 2

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: Optional[jax.Array] = None, *,
               train: bool = False):
    shape = self.shape
    gs = grid_size(self.image_size, shape.patch)
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"Encoder expects [B, {self.image_size}, {self.image_size}, 3] images, "
                       f"got {images.shape}")
    c = self.student
    x = PatchEmbed(shape.patch, shape.width, c.dtype, c.param_dtype, name="patch_embed")(images)
    table = sincos_2d(shape.width, gs, cls_token=True)
    if self.pos_embed == "learned":
      pos = self.param("pos_embed", nn.with_logical_partitioning(
          lambda key, shp, dtype: jnp.asarray(table, dtype)[None], (None, None, "embed")),
                       (1, gs * gs + 1, shape.width), c.param_dtype).astype(x.dtype)
    elif self.pos_embed == "sincos":
      pos = jnp.asarray(table, x.dtype)[None]
    else:
      raise ValueError(f"config.model.pos_embed={self.pos_embed!r}: 'sincos' or 'learned'")
    x = x + pos[:, 1:]
    if ids_keep is not None:
      x = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, shape.width),
                     c.param_dtype)
    cls = cls.astype(x.dtype) + pos[:, :1]     # the fixed table's CLS row is zero
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, shape.width)), x], axis=1)
    x = Transformer(shape.depth, shape.heads, shape.mlp_dim, c,
                    name="transformer")(x, deterministic=not train)
    aux = {"pre_norm": x}
    if self.final_norm:
      x = layer_norm("norm", c.dtype, c.param_dtype)(x)
    aux["cls"] = x[:, 0]
    return x, aux

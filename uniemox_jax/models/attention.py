"""Scaled dot-product attention with a choice of kernel: cuDNN flash attention or XLA's.

`jax.nn.dot_product_attention` with no `implementation` always takes XLA's unfused path (jax
0.10 and 0.11); cuDNN's fused kernel must be asked for by name, and only takes bf16/fp16
inputs with a head dimension that is a multiple of 8. For training it also refuses odd
sequence lengths (jax 0.11.2 on an H200: "Unsupported sequence length Q 197, KV 197"). So, by
default, an odd length is padded to the next multiple of 64 (197 -> 256: the MAE-B/16 step
ran 1.33x faster than with XLA's attention that way) and an even one is left alone (50
tokens ran fastest unpadded; every padding multiple was slower). See docs/benchmarks.md.
The padded keys are masked through `key_value_seq_lengths`, which both kernels honour, and
the padded query rows are sliced off: the result equals unpadded attention (tested against
the XLA path).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "cudnn", "xla")
# cuDNN's default: odd lengths padded to this multiple, even lengths unpadded.
CUDNN_ODD_PAD = 64


@functools.lru_cache(maxsize=None)
def cudnn_available() -> bool:
  """True when the default backend is an NVIDIA GPU with cuDNN (where the fused kernel
  exists)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and "rocm" not in device.client.platform_version.lower()


def check_implementation(name: str, field: str = "config.model.attention") -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{field}={name!r}: choose one of {IMPLEMENTATIONS}")
  return name


def resolve(name: str, dtype, head_dim: int) -> str:
  """The kernel `name` means for these inputs: "auto" takes cuDNN where it can run them."""
  check_implementation(name)
  supported = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
               and head_dim % 8 == 0 and head_dim <= 128)
  if name == "cudnn" and not supported:
    raise ValueError(f"config.model.attention='cudnn' needs bfloat16/float16 compute and a head "
                     f"dimension that is a multiple of 8 (at most 128); got {jnp.dtype(dtype)} "
                     f"and {head_dim}: use 'auto' or 'xla'")
  if name != "auto":
    return name
  return "cudnn" if supported and cudnn_available() else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str = "auto", pad_to: Optional[int] = None
                          ) -> jax.Array:
  """Non-causal attention of [B, T, H, D] queries over [B, S, H, D] keys and values.

  Both sequence lengths are rounded up to a multiple of `pad_to` and the padded keys are
  masked out. Default: for cuDNN, odd lengths to a multiple of 64 and even ones unpadded; for
  XLA, no padding.
  """
  impl = resolve(implementation, q.dtype, q.shape[-1])
  t, s = q.shape[1], k.shape[1]
  padded_t, padded_s = padded_lengths(impl, t, s, pad_to)
  lengths = {}
  if (padded_t, padded_s) != (t, s):
    batch = q.shape[0]
    q = _pad_seq(q, padded_t)
    k, v = _pad_seq(k, padded_s), _pad_seq(v, padded_s)
    # Only keys are masked: a padded query row still attends to the real keys (finite, no
    # all-masked softmax whose gradient could turn NaN) and is sliced off below.
    lengths = dict(key_value_seq_lengths=jnp.full((batch,), s, jnp.int32))
  out = jax.nn.dot_product_attention(q, k, v, implementation=impl, **lengths)
  return out[:, :t]


def padded_lengths(impl: str, t: int, s: int, pad_to: Optional[int] = None):
  """The (query, key) lengths the kernel `impl` is given for lengths (t, s)."""
  if pad_to is None:
    pad_to = CUDNN_ODD_PAD if impl == "cudnn" and (t % 2 or s % 2) else 1
  return _round_up(t, pad_to), _round_up(s, pad_to)


def _round_up(n: int, multiple: int) -> int:
  if multiple < 1:
    raise ValueError(f"config.model.attention_pad={multiple}: must be >= 1 (0: the kernel's "
                     "default)")
  return -(-n // multiple) * multiple


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
  if x.shape[1] == length:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

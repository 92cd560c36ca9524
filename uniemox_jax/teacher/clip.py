"""The frozen CLIP teacher (METHOD.md 2): `transformers`' Flax CLIP behind one small class.

Its parameters are a separate pytree that the caller passes in explicitly; they are never
part of the trainable parameters, never in the optimizer and never checkpointed, and every
output leaves through `jax.lax.stop_gradient`. This is the only module that imports
`transformers`' CLIP, so a change of CLIP source touches this file alone.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax import augment
from uniemox_jax import losses

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
MAX_TEXT_TOKENS = 77

# The student's normalization (applied on device by uniemox_jax.augment).
IMAGENET_MEAN, IMAGENET_STD = augment.IMAGENET_MEAN, augment.IMAGENET_STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

# A directory that holds a Flax CLIP has its config and one of these weight files.
_WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin")


def renormalize(images: jax.Array, src: Sequence[Sequence[float]],
                dst: Sequence[Sequence[float]]) -> jax.Array:
  """Maps images normalized with (mean, std) `src` to normalization `dst`, on device."""
  def channels(values):
    return jnp.asarray(values, images.dtype).reshape((1,) * (images.ndim - 1) + (-1,))
  (src_mean, src_std), (dst_mean, dst_std) = src, dst
  raw = images * channels(src_std) + channels(src_mean)
  return (raw - channels(dst_mean)) / channels(dst_std)


def tokenize(tokenizer, texts: Sequence[str]) -> Dict[str, np.ndarray]:
  """[len(texts), 77] int32 ids and attention mask: truncated (EOS kept last), padded."""
  out = tokenizer(list(texts), max_length=MAX_TEXT_TOKENS, truncation=True,
                  padding="max_length", return_tensors="np")
  return {"input_ids": out["input_ids"].astype(np.int32),
          "attention_mask": out["attention_mask"].astype(np.int32)}


def tokenize_one(tokenizer, text: str) -> Dict[str, np.ndarray]:
  """One prompt's [77] ids and mask (the per-record form the input pipeline wants)."""
  return {k: v[0] for k, v in tokenize(tokenizer, [text]).items()}


def _check_source(name_or_dir: str) -> None:
  """Fails early, naming the path, for a local directory that cannot hold a CLIP model."""
  looks_local = os.path.isabs(name_or_dir) or name_or_dir.startswith((".", "~")) or \
      os.path.exists(name_or_dir)
  if not looks_local:
    return
  path = os.path.expanduser(name_or_dir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CLIP teacher directory {name_or_dir!r} does not exist "
                            "(config.teacher.name: a hub id or a local directory)")
  present = set(os.listdir(path))
  if "config.json" not in present or not present & set(_WEIGHT_FILES):
    raise FileNotFoundError(
        f"CLIP teacher directory {name_or_dir!r} lacks config.json or a weight file "
        f"({', '.join(_WEIGHT_FILES)}); it holds: {sorted(present) or 'nothing'}")


@dataclasses.dataclass
class ClipTeacher:
  """A frozen CLIP: `model` is a `FlaxCLIPModel` (used for its pure functions only), `params`
  its weights, `tokenizer` the matching CLIP tokenizer (optional when text embeddings come
  precomputed with the data).

  `normalization` says which statistics the CLIP image tower sees: "clip" (CLIP's own, our
  default) or "imagenet" (what the reference code feeds it). Student images arrive
  ImageNet-normalized and are mapped on device.
  """
  model: Any
  params: Any
  tokenizer: Any = None
  normalization: str = "clip"

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"config.teacher.normalization={self.normalization!r}: choose one of "
                       f"{sorted(NORMALIZATIONS)}")

  @classmethod
  def load(cls, name_or_dir: str = DEFAULT_CLIP, *, dtype: Any = jnp.float32,
           normalization: str = "clip", with_tokenizer: bool = True) -> "ClipTeacher":
    """Loads a hub id (for example "openai/clip-vit-base-patch16") or a local directory
    written by `save_pretrained`. Compute runs in `dtype`; weights stay as stored."""
    from transformers import AutoTokenizer, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
    _check_source(name_or_dir)
    try:
      model, params = FlaxCLIPModel.from_pretrained(name_or_dir, dtype=dtype, _do_init=False)
    except (OSError, ValueError) as e:
      raise OSError(f"could not load the CLIP teacher from {name_or_dir!r} "
                    f"(config.teacher.name): {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir) if with_tokenizer else None
    return cls(model, params, tokenizer, normalization)

  @property
  def embed_dim(self) -> int:
    return int(self.model.config.projection_dim)

  @property
  def image_size(self) -> int:
    return int(self.model.config.vision_config.image_size)

  # Pure functions of (params, inputs): safe under jit, grad and sharding.

  def image_embed(self, params, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] ImageNet-normalized student crops -> L2-normalized [B, D] (omega)."""
    x = images.astype(jnp.float32)
    if self.normalization == "clip":
      x = renormalize(x, NORMALIZATIONS["imagenet"], NORMALIZATIONS["clip"])
    size = self.image_size
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bicubic")
    feats = self.model.get_image_features(jnp.transpose(x, (0, 3, 1, 2)), params=params)
    return jax.lax.stop_gradient(losses.l2_normalize(feats))

  def text_embed(self, params, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Token ids [B, T] -> L2-normalized [B, D] (lambda)."""
    feats = self.model.get_text_features(input_ids, attention_mask=attention_mask,
                                         params=params)
    return jax.lax.stop_gradient(losses.l2_normalize(feats))

  def logit_scale(self, params) -> jax.Array:
    return jax.lax.stop_gradient(jnp.exp(params["logit_scale"].astype(jnp.float32)))

  # Host-side helpers.

  def tokenize(self, texts: Sequence[str]) -> Dict[str, np.ndarray]:
    """CLIP tokens, truncated (EOS kept last) and padded to 77."""
    if self.tokenizer is None:
      raise ValueError("this ClipTeacher was loaded without a tokenizer")
    return tokenize(self.tokenizer, texts)

  def embed_texts(self, texts: Iterable[str], batch_size: int = 256) -> np.ndarray:
    """Text embeddings of many prompts, in batches (the conversion tool's path)."""
    fn = jax.jit(self.text_embed)
    texts = list(texts)
    chunks: List[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
      batch = texts[start:start + batch_size]
      tokens = self.tokenize(batch + [""] * (batch_size - len(batch)))  # one compiled shape
      emb = fn(self.params, tokens["input_ids"], tokens["attention_mask"])
      chunks.append(np.asarray(emb[:len(batch)], np.float32))
    if not chunks:
      return np.zeros((0, self.embed_dim), np.float32)
    return np.concatenate(chunks)

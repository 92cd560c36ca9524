"""The frozen CLIP teacher: `transformers`' Flax CLIP behind one small class.

Its parameters are a separate pytree that the caller passes in explicitly; they are never
part of the trainable parameters, never in the optimizer and never checkpointed, and every
output leaves through `jax.lax.stop_gradient`. This is the only module that imports
`transformers`' CLIP, so a change of CLIP source touches this file alone.

Two implementations of the image tower (`impl`): "transformers" runs `FlaxCLIPModel` itself;
"fused" runs `uniemox_jax.teacher.clip_vision.ClipVisionTower` on the same weights (one qkv
matmul, fused attention, last block on CLS only), the fast path for training. The text tower
is transformers' in both: it runs once per prompt at conversion, or per step only for data
converted without text embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax import augment
from uniemox_jax import hf_weights
from uniemox_jax import losses
from uniemox_jax.teacher import clip_vision

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
MAX_TEXT_TOKENS = 77

# The student's normalization (applied on device by uniemox_jax.augment).
IMAGENET_MEAN, IMAGENET_STD = augment.IMAGENET_MEAN, augment.IMAGENET_STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

IMPLEMENTATIONS = ("transformers", "fused")


# Images normalized with one (mean, std) mapped to another, on device.
renormalize = augment.renormalize


def tokenize(tokenizer, texts: Sequence[str]) -> Dict[str, np.ndarray]:
  """[len(texts), 77] int32 ids and attention mask: truncated (EOS kept last), padded."""
  out = tokenizer(list(texts), max_length=MAX_TEXT_TOKENS, truncation=True,
                  padding="max_length", return_tensors="np")
  return {"input_ids": out["input_ids"].astype(np.int32),
          "attention_mask": out["attention_mask"].astype(np.int32)}


def tokenize_one(tokenizer, text: str) -> Dict[str, np.ndarray]:
  """One prompt's [77] ids and mask (the per-record form the input pipeline wants)."""
  return {k: v[0] for k, v in tokenize(tokenizer, [text]).items()}


@dataclasses.dataclass
class ClipTeacher:
  """A frozen CLIP: `model` is a `FlaxCLIPModel` (used for its pure functions only), `params`
  its weights, `tokenizer` the matching CLIP tokenizer (optional when text embeddings come
  precomputed with the data).

  `normalization` says which statistics the CLIP image tower sees: "clip" (CLIP's own, our
  default) or "imagenet" (what the reference code feeds it). Student images arrive
  ImageNet-normalized and are mapped on device.

  With `impl="fused"`, `params` holds the fused tower's weights under "vision" beside
  transformers' text tower ("text_model", "text_projection") and "logit_scale"; `model` may
  then be None (no text tower: the data must carry text embeddings). With `scan`, the fused
  tower runs its blocks as one `nn.scan` (`clip_vision.ClipVisionTower`), its weights
  stacked here once.
  """
  model: Any
  params: Any
  tokenizer: Any = None
  normalization: str = "clip"
  impl: str = "transformers"
  vision_config: Optional[clip_vision.VisionConfig] = None
  dtype: Any = jnp.float32
  attention: str = "auto"
  scan: bool = False

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"config.teacher.normalization={self.normalization!r}: choose one of "
                       f"{sorted(NORMALIZATIONS)}")
    if self.impl not in IMPLEMENTATIONS:
      raise ValueError(f"config.teacher.impl={self.impl!r}: choose one of {IMPLEMENTATIONS}")
    if self.impl == "fused" and self.vision_config is None:
      self.vision_config = clip_vision.VisionConfig.from_clip_config(self.model.config)
    if self.scan:
      if self.impl != "fused":
        raise ValueError("config.teacher.scan=True needs config.teacher.impl='fused' "
                         "(transformers' tower is not scanned)")
      self.params = dict(self.params, vision=clip_vision.scan_layout(
          self.params["vision"], self.vision_config.depth))

  @classmethod
  def load(cls, name_or_dir: str = DEFAULT_CLIP, *, dtype: Any = jnp.float32,
           normalization: str = "clip", with_tokenizer: bool = True,
           impl: str = "transformers", attention: str = "auto", scan: bool = False
           ) -> "ClipTeacher":
    """Loads a hub id (for example "openai/clip-vit-base-patch16") or a local directory
    written by `save_pretrained` (Flax weights, or PyTorch's `model.safetensors` /
    `pytorch_model.bin`). Compute runs in `dtype`; weights stay as stored."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    if impl not in IMPLEMENTATIONS:
      raise ValueError(f"config.teacher.impl={impl!r}: choose one of {IMPLEMENTATIONS}")
    from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
    model, params = hf_weights.from_pretrained(FlaxCLIPModel, name_or_dir, dtype,
                                               "CLIP teacher", "config.teacher.name")
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir) if with_tokenizer else None
    config = None
    if impl == "fused":
      config = clip_vision.VisionConfig.from_clip_config(model.config)
      params = {"vision": clip_vision.from_transformers(params, config),
                **{k: params[k] for k in ("text_model", "text_projection", "logit_scale")}}
    return cls(model, params, tokenizer, normalization, impl, config, dtype, attention, scan)

  @classmethod
  def from_vision_tower(cls, config: clip_vision.VisionConfig, vision_params: Any,
                        logit_scale: float = float(np.log(100.0)), *, dtype: Any = jnp.float32,
                        normalization: str = "clip", attention: str = "auto",
                        scan: bool = False) -> "ClipTeacher":
    """A fused image tower alone (no transformers, no text tower): for benchmarks and for
    data that carries text embeddings."""
    params = {"vision": vision_params, "logit_scale": np.float32(logit_scale)}
    return cls(None, params, None, normalization, "fused", config, dtype, attention, scan)

  @property
  def embed_dim(self) -> int:
    if self.vision_config is not None:
      return self.vision_config.embed_dim
    return int(self.model.config.projection_dim)

  @property
  def image_size(self) -> int:
    if self.vision_config is not None:
      return self.vision_config.image_size
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
    if self.impl == "fused":
      tower = clip_vision.ClipVisionTower(self.vision_config, dtype=self.dtype,
                                          attention=self.attention, scan=self.scan)
      feats = tower.apply({"params": params["vision"]}, x.astype(self.dtype))
    else:
      feats = self.model.get_image_features(jnp.transpose(x, (0, 3, 1, 2)), params=params)
    feats = feats.astype(jnp.float32)
    return jax.lax.stop_gradient(losses.l2_normalize(feats))

  def text_embed(self, params, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Token ids [B, T] -> L2-normalized [B, D] (lambda)."""
    if self.model is None:
      raise ValueError("this CLIP teacher has no text tower (built from a vision tower alone): "
                       "convert the data with --text_embeddings")
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

"""What a model looks at: heatmaps of one emotion over each image, the library
of the explain command (`python -m uniemox_jax.explain`) and of the `explain` evaluator.

Methods (docs/method.md, "Heatmaps"), each a map per image for a target class (the predicted
one, or a named one):
  rollout       attention rollout (Abnar and Zuidema 2020): each block's attention, its heads
                fused (mean, max or min) and its smallest `discard_ratio` of entries zeroed,
                averaged with the identity (the residual path) and renormalized, multiplied
                through the blocks; the pooled token's row over the patches (the CLS row for
                pool "token", the mean of the patch rows for pool "avg"). Class-agnostic.
  gradcam       Grad-CAM on the patch tokens entering the last block (its input, the
                residual stream): ReLU(sum_d w_d * token_d), w_d the mean over patches of the
                target logit's gradient with respect to them.
  grad_x_input  gradient x input of the target logit, summed over each patch's pixels and
                channels, ReLU: a patch's first-order share of the logit (the patch
                embedding is linear, so this is gradient x input at the embedding, no bias).

A pretraining checkpoint has no logits: its map ("similarity") is the Grad-CAM of the cosine
similarity between the fused token gamma and a class's CLIP text embedding (zero-shot's
score), on the scene view's tokens entering the encoder's last block.

The attention probabilities are recomputed from each block's qkv projection (softmax of
q.k / sqrt(head_dim), what every attention kernel of models/attention.py computes), so the
model's kernels need not expose them; the model runs in the unrolled block layout.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniemox_jax import augment
from uniemox_jax import errors
from uniemox_jax.models import vit

METHODS = ("rollout", "gradcam", "grad_x_input")
HEAD_FUSIONS = ("mean", "max", "min")


def unrolled(model):
  """The same classifier with its blocks unrolled and no remat: the explanations hook into
  each block (checkpoints convert with `surgery.to_layout(params, scanned=False)`)."""
  if not hasattr(model, "student"):
    raise errors.UserError("heatmaps hook into this codebase's ViT classifier; a "
                           "transformers backbone (config.model.backbone) is not explained")
  return model.clone(student=dataclasses.replace(model.student, scan=False, remat="none"))


def check_methods(methods: Sequence[str], flag: str = "--method") -> List[str]:
  methods = [m for m in methods if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise errors.UserError(f"{flag} {','.join(methods) or '(none)'}: choose from "
                           f"{', '.join(METHODS)}")
  return methods


def _forward(model, params, inputs, delta=None, method=None):
  """(the model's output, the tokens entering the encoder's last block [B, T, W], each
  block's qkv [B, T, 3, H, d]); `delta` is added to those tokens (its gradient is theirs).
  A classifier is applied to `inputs`; with `method` (UniEmoX.embed) that method is."""
  qkvs, tokens = [], []
  last = f"block_{vit.decode_variant(model.variant).depth - 1}"

  def record(next_fun, args, kwargs, context):
    # Only the encoder's blocks run here (UniEmoX.embed never runs the decoder's).
    if (context.method_name == "__call__" and isinstance(context.module, vit.Block)
        and context.module.name == last):
      args = (args[0] if delta is None else args[0] + delta,) + tuple(args[1:])
      tokens.append(args[0])
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__" and isinstance(context.module, vit.Projection)
        and context.module.name == "qkv"):
      qkvs.append(out)
    return out

  with nn.intercept_methods(record):
    if method is None:
      out = model.apply({"params": params}, *inputs, train=False)
    else:
      out = model.apply({"params": params}, *inputs, method=method)
  return out, tokens[0], qkvs


def _zero_tokens(model, batch: int) -> jax.Array:
  """Zeros shaped as the tokens entering the encoder's last block: [B, 1 + g*g, width]."""
  shape = vit.decode_variant(model.variant)
  return jnp.zeros((batch, 1 + vit.grid_size(model.image_size, shape.patch) ** 2,
                    shape.width))


def _gradcam(tokens: jax.Array, grads: jax.Array) -> jax.Array:
  """[B, g, g]: ReLU(tokens . w) over the patch tokens, w their mean gradient."""
  weights = grads[:, 1:].mean(axis=1)
  cam = jax.nn.relu(jnp.einsum("bnw,bw->bn", tokens[:, 1:], weights))
  side = int(round(cam.shape[1] ** 0.5))
  return cam.reshape(cam.shape[0], side, side)


def _patch_sums(pixels: jax.Array, side: int) -> jax.Array:
  """[B, S, S, C] -> [B, g, g]: ReLU of each patch's sum (pixels past the last whole patch,
  which the patch embedding does not read, left out)."""
  batch, patch = pixels.shape[0], pixels.shape[1] // side
  pixels = pixels[:, :side * patch, :side * patch]
  return jax.nn.relu(pixels.reshape(batch, side, patch, side, patch, -1).sum(axis=(2, 4, 5)))


def attentions(qkvs: Sequence[jax.Array]) -> List[jax.Array]:
  """Each block's attention probabilities [B, H, T, T] from its qkv projection."""
  out = []
  for qkv in qkvs:
    q, k = qkv[:, :, 0].astype(jnp.float32), qkv[:, :, 1].astype(jnp.float32)
    out.append(jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]),
                              axis=-1))
  return out


def rollout(attention: Sequence[jax.Array], pool: str, head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> jax.Array:
  """[B, g, g]: the rolled-out attention of the pooled token over the patches."""
  if head_fusion not in HEAD_FUSIONS:
    raise errors.UserError(f"head fusion {head_fusion!r}: choose one of {HEAD_FUSIONS}")
  if not 0.0 <= discard_ratio < 1.0:
    raise errors.UserError(f"discard ratio {discard_ratio}: choose one in [0, 1)")
  batch, _, tokens, _ = attention[0].shape
  eye = jnp.eye(tokens)[None]
  result = jnp.broadcast_to(eye, (batch, tokens, tokens))
  for a in attention:
    fused = getattr(jnp, head_fusion)(a, axis=1)
    drop = int(tokens * tokens * discard_ratio)
    if drop:
      flat = fused.reshape(batch, -1)
      rank = jnp.argsort(jnp.argsort(flat, axis=-1), axis=-1)
      fused = jnp.where(rank < drop, 0.0, flat).reshape(fused.shape)
    a = 0.5 * fused + 0.5 * eye
    a = a / a.sum(axis=-1, keepdims=True)
    result = a @ result
  rows = result[:, 0, 1:] if pool == "token" else result[:, 1:, 1:].mean(axis=1)
  side = int(round((tokens - 1) ** 0.5))
  return rows.reshape(batch, side, side)


def explainer(model, pool: str, methods: Sequence[str], head_fusion: str = "mean",
              discard_ratio: float = 0.0, multi_label: bool = False):
  """A jitted (params, uint8 images [B, S, S, 3], target [B] int or -1 for the predicted
  class) -> {"probabilities": [B, C] (softmax, or per-class sigmoids with `multi_label`),
  "target": [B], method: map}, every map [B, g, g] on the patch grid."""
  methods = check_methods(methods)
  grid = vit.grid_size(model.image_size, vit.decode_variant(model.variant).patch)

  @jax.jit
  def run(params, images, target):
    x = augment.normalize(images)

    def logits_of(delta, x):
      (logits, _), tokens, qkvs = _forward(model, params, (x,), delta)
      return logits, (tokens, qkvs)

    # One forward pass; its pullback, taken once the target is known, gives the target
    # logit's gradient with respect to both the last block's tokens and the input.
    logits, pullback, (tokens, qkvs) = jax.vjp(logits_of, _zero_tokens(model, x.shape[0]), x,
                                               has_aux=True)
    target = jnp.where(target < 0, jnp.argmax(logits, axis=-1), target)
    out = {"probabilities": jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits),
           "target": target}
    if "rollout" in methods:
      out["rollout"] = rollout(attentions(qkvs), pool, head_fusion, discard_ratio)
    if "gradcam" in methods or "grad_x_input" in methods:
      token_grads, input_grads = pullback(jax.nn.one_hot(target, logits.shape[-1],
                                                         dtype=logits.dtype))
      if "gradcam" in methods:
        out["gradcam"] = _gradcam(tokens, token_grads)
      if "grad_x_input" in methods:
        out["grad_x_input"] = _patch_sums(input_grads * x, grid)
    return out

  return lambda params, images, target: jax.device_get(run(params, images, target))


def similarity_explainer(model, text: np.ndarray, logit_scale: float,
                         multi_label: bool = False):
  """For a pretraining checkpoint (UniEmoX, unrolled): a jitted (params, uint8 scene and
  person views [B, S, S, 3], target [B] or -1 for the best-matching class) ->
  {"probabilities" (zero-shot's scores), "target", "similarity": [B, g, g]}: Grad-CAM of the
  cosine similarity of the fused token gamma to the target class's text embedding (`text`,
  [C, E], normalized), on the scene view's tokens entering the encoder's last block."""
  from uniemox_jax.models.uniemox import UniEmoX  # pylint: disable=g-import-not-at-top
  text = jnp.asarray(text, jnp.float32)

  @jax.jit
  def run(params, scene, person, target):
    views = (augment.normalize(scene), augment.normalize(person))

    def similarities(delta):
      out, tokens, _ = _forward(model, params, views, delta, method=UniEmoX.embed)
      gamma = out["gamma"].astype(jnp.float32)
      return gamma / jnp.linalg.norm(gamma, axis=-1, keepdims=True) @ text.T, tokens

    batch = scene.shape[0]          # the encoder sees [scene; person]
    sims, pullback, tokens = jax.vjp(similarities, _zero_tokens(model, 2 * batch),
                                     has_aux=True)
    target = jnp.where(target < 0, jnp.argmax(sims, axis=-1), target)
    logits = logit_scale * sims
    (grads,) = pullback(jax.nn.one_hot(target, sims.shape[-1], dtype=sims.dtype))
    return {"probabilities": jax.nn.sigmoid(logits) if multi_label else
            jax.nn.softmax(logits), "target": target,
            "similarity": _gradcam(tokens[:batch], grads[:batch])}   # the scene's half

  return lambda params, scene, person, target: jax.device_get(
      run(params, scene, person, target))


def mass_in_box(heatmap: np.ndarray, box: Sequence[int], image_size: int) -> float:
  """The share of a non-negative map's mass inside box (y0, x0, y1, x1) in image pixels."""
  m = np.asarray(upsample(heatmap, image_size), np.float64)
  y0, x0, y1, x1 = box
  return float(m[y0:y1, x0:x1].sum() / max(m.sum(), 1e-12))


def upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
  """A [g, g] map to [size, size] by whole-pixel blocks (a patch keeps its value)."""
  scale = size // heatmap.shape[0]
  if heatmap.shape[0] == size:
    return heatmap
  return np.repeat(np.repeat(heatmap, scale, axis=0), scale, axis=1)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 [S, S, 3]: `image` under the map (scaled to [0, 1] by its maximum), jet-coloured."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  m = upsample(np.asarray(heatmap, np.float32), image.shape[0])
  m = m / m.max() if m.max() > 0 else m
  colours = colormaps["jet"](m)[..., :3] * 255.0
  return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)


def panels(images: np.ndarray, result: Dict[str, np.ndarray], methods: Sequence[str],
           class_names: Sequence[str]) -> Dict[str, object]:
  """Columns for `reports.image_grid`: the images, then one overlay per method; each row's
  label: the target class and its probability."""
  labels = []
  for i, t in enumerate(result["target"]):
    labels.append(f"{class_names[int(t)]} {float(result['probabilities'][i, int(t)]):.2f}")
  columns = [("image", list(images))]
  columns += [(m, [overlay(img, result[m][i]) for i, img in enumerate(images)])
              for m in methods]
  return {"columns": columns, "row_labels": labels}

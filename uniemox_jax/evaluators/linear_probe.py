"""Linear probe: a frozen pretrained encoder's features, computed once, and a linear classifier
trained on them (configs/linear_probe.py).

Features: pooled exactly as the fine-tuning head pools (the encoder without its final norm,
the mean of the patch tokens, fc_norm as initialized: unit scale, zero bias), for every record of the train, validation and test splits exactly once
(eval transform, no augmentation), standardized with the train statistics (a BatchNorm
without affine terms, as MAE's probe). The classifier: full-batch AdamW on device for
`config.probe.steps`, once per weight decay in `config.probe.weight_decays`; the one with the
best validation headline (top-1, or mAP) is reported on the test split. Reports go to
WORKDIR/linear_probe/.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import datasets
from uniemox_jax import evaluate
from uniemox_jax import importers
from uniemox_jax import metrics
from uniemox_jax import sharding
from uniemox_jax import storage
from uniemox_jax.models import vit


def encoder_features(config, encoder_params, splits: Sequence[str], mesh, data_dir: str,
                     progress: bool = True) -> Dict[str, Dict[str, np.ndarray]]:
  """For each split: {"features" [N, D], "label" (and "labels")} of every record, in order.
  The encoder is placed and compiled once for all of them."""
  m = config.model
  # Pooled as the fine-tuning head pools: the encoder without its final norm, the mean of the
  # patch tokens, then fc_norm as the head starts (a LayerNorm with unit scale, zero bias).
  encoder = vit.Encoder(m.variant, m.image_size, final_norm=False)
  encoder_params = {k: v for k, v in encoder_params.items() if k != "norm"}
  params = sharding.host_to_global(encoder_params, sharding.replicated(mesh))
  batch_size = evaluate.check_batch(config.eval_batch_size, mesh)

  @jax.jit
  def fn(p, batch):
    tokens, _ = encoder.apply({"params": p}, augment.normalize(batch["image"]), train=False)
    pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    mean = pooled.mean(axis=-1, keepdims=True)
    var = pooled.var(axis=-1, keepdims=True)
    return {"features": (pooled - mean) / jnp.sqrt(var + vit.LN_EPS)}
  out = {}
  for split in splits:
    dataset = input_pipeline.eval_dataset(
        data_dir, split, batch_size=batch_size, image_size=m.image_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    out[split] = evaluate.gather_split(functools.partial(fn, params), dataset, mesh,
                                       progress=progress, description=f"features {split}")
  return out


def train_linear(features: np.ndarray, targets: np.ndarray, multi_label: bool,
                 steps: int, lr: float, weight_decay: float, seed: int = 0
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """(W [D, C], b [C]) minimizing softmax (or sigmoid) cross-entropy, full batch."""
  x, y = jnp.asarray(features), jnp.asarray(targets, jnp.float32)
  params = {"w": 0.01 * jax.random.normal(jax.random.key(seed), (x.shape[1], y.shape[1])),
            "b": jnp.zeros((y.shape[1],))}
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay,
                   mask={"w": True, "b": False})

  def loss(p):
    logits = x @ p["w"] + p["b"][None, :]
    if multi_label:
      return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
    return jnp.mean(optax.softmax_cross_entropy(logits, y))

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, opt_state = carry
      grads = jax.grad(loss)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return p
  fitted = jax.device_get(fit(params))
  return np.asarray(fitted["w"]), np.asarray(fitted["b"])


def _scores(features, w, b, multi_label):
  logits = features @ w + b
  return np.asarray(jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits))


def linear_probe(config, workdir: str) -> Dict[str, Any]:
  """Features once, a classifier per weight decay, the best on validation reported on test."""
  data_dir = datasets.resolve_data_dir(config, workdir)
  info = input_pipeline.load_info(data_dir)
  datasets.check_dataset(config, info)
  multi = bool(info.get("multi_label"))
  if not config.init.encoder:
    raise ValueError("config.init.encoder is empty: a linear probe needs a pretrained encoder")
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  encoder = importers.import_encoder(config, None)
  splits = [config.data.split, config.data.eval_split] + (
      [config.test_split] if config.get("test_split") else [])
  feats = encoder_features(config, encoder, splits, mesh, data_dir)
  train = feats[config.data.split]
  mean = train["features"].mean(axis=0)
  std = train["features"].std(axis=0) + 1e-6
  for s in splits:
    feats[s]["features"] = (feats[s]["features"] - mean) / std
  num_classes = len(info["class_names"])
  targets = train["labels"] if multi else np.eye(num_classes)[train["label"]]
  out_dir = storage.join(workdir, "linear_probe")
  best = None
  for wd in config.probe.weight_decays:
    w, b = train_linear(train["features"], targets, multi, config.probe.steps, config.probe.lr,
                        wd, config.seed)
    val = feats[config.data.eval_split]
    result = evaluate.report(_scores(val["features"], w, b, multi), val, info)
    logging.info("linear probe weight decay %g: validation %s %.4f", wd,
                 "mAP" if multi else "top-1", metrics.headline(result))
    if best is None or metrics.headline(result) > metrics.headline(best[2]):
      best = (w, b, result, wd)
  w, b, val_result, wd = best
  val_result["weight_decay"] = wd
  summary = {"best_weight_decay": wd, "val": metrics.headline(val_result)}
  if jax.process_index() == 0:
    evaluate.write_report(val_result, out_dir, config.data.eval_split)
  if config.get("test_split"):
    test = feats[config.test_split]
    result = evaluate.report(_scores(test["features"], w, b, multi), test, info)
    result.update(weight_decay=wd, checkpoint=config.init.encoder, split=config.test_split)
    if jax.process_index() == 0:
      evaluate.write_report(result, out_dir, config.test_split)
    summary["test"] = result
  return summary

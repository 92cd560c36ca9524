"""Linear probe: a frozen encoder's features, computed once per run, and a linear classifier
trained on them.

Features: pooled exactly as the fine-tuning head pools (the encoder without its final norm,
the mean of the patch tokens, fc_norm as initialized: unit scale, zero bias), for every record of the train, validation and test splits exactly once
(eval transform, no augmentation), standardized with the train statistics (a BatchNorm
without affine terms, as MAE's probe). The classifier: full-batch AdamW on device for
`steps`, once per weight decay in `weight_decays`; with a `val_split`, the one with the best
validation headline (top-1, or mAP) is reported on `split`, otherwise the best on `split`
itself (a monitor during pretraining, not a benchmark number). The task
(`uniemox_jax.linear_probe`, configs/linear_probe.py) runs this evaluator on an imported
encoder.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import reports
from uniemox_jax.models import hf_backbone
from uniemox_jax.models import vit


def feature_fn(config, pos_embed: str = "sincos"):
  """A jitted (encoder params, batch) -> {"features"}: pooled as the fine-tuning head pools:
  the encoder without its final norm, the mean of the patch tokens, then fc_norm as the head
  starts (a LayerNorm with unit scale, zero bias). `pos_embed` as the encoder has it: the
  fixed table of a pretraining encoder, or a learned one (an imported timm ViT)."""
  m = config.model
  encoder = vit.Encoder(m.variant, m.image_size, final_norm=False, pos_embed=pos_embed)

  @jax.jit
  def fn(p, batch):
    tokens, _ = encoder.apply({"params": p}, augment.normalize(batch["image"]), train=False)
    pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    mean = pooled.mean(axis=-1, keepdims=True)
    var = pooled.var(axis=-1, keepdims=True)
    return {"features": (pooled - mean) / jnp.sqrt(var + vit.LN_EPS)}
  return fn


def backbone_feature_fn(config):
  """feature_fn's counterpart for a transformers backbone (config.model.backbone): its pooled
  features (`hf_backbone.features`); the probe standardizes them as it does ours."""
  spec = hf_backbone.backbone_spec(config.model.backbone)
  dtype = models.dtype(config.model.dtype)

  @jax.jit
  def fn(variables, batch):
    return {"features": hf_backbone.features(
        spec, variables, augment.normalize(batch["image"]), dtype=dtype).astype(jnp.float32)}
  return fn


def encoder_features(config, encoder_params, splits: Sequence[str], mesh, data_dir: str,
                     progress: bool = True, fn=None) -> Dict[str, Dict[str, np.ndarray]]:
  """For each split: {"features" [N, D], "label" (and "labels")} of every record, in order,
  through `fn` (a `feature_fn`). The encoder is placed and compiled once for all of them."""
  fn = fn or feature_fn(config, "learned" if "pos_embed" in encoder_params else "sincos")
  encoder_params = _placed(encoder_params, mesh)
  batch_size = gathering.check_batch(config.eval_batch_size, mesh)
  out = {}
  for split in splits:
    dataset = input_pipeline.eval_dataset(
        data_dir, split, batch_size=batch_size, image_size=config.model.image_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    out[split] = gathering.gather_split(functools.partial(fn, encoder_params), dataset, mesh,
                                       progress=progress, description=f"features {split}")
  return out


def _placed(encoder_params, mesh):
  """The encoder's parameters as the feature functions read them: without the final norm."""
  return base.place({k: v for k, v in encoder_params.items() if k != "norm"}, mesh)


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


class LinearProbe(base.Evaluator):
  reads = base.ENCODER
  # train_fraction < 1: the classifier sees that seeded, stratified fraction of each class of
  # train_split (`input_pipeline.train_subset`, seeded by config.seed).
  defaults = {"train_split": "train", "val_split": "", "steps": 500, "lr": 1e-2,
              "weight_decays": (0.0, 1e-4, 1e-3, 1e-2), "train_fraction": 1.0}

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.fns = {}         # one feature function (an EvalStep) per position table kind
    self.multi = self.info.multi_label

  def feature_fn(self, encoder_params):
    if self.config.model.get("backbone"):
      kind = "backbone"
      if kind not in self.fns:
        self.fns[kind] = gathering.EvalStep(backbone_feature_fn(self.config), self.field)
      return self.fns[kind]
    kind = "learned" if "pos_embed" in encoder_params else "sincos"
    if kind not in self.fns:
      self.fns[kind] = gathering.EvalStep(feature_fn(self.config, kind), self.field)
    return self.fns[kind]

  def compile_ahead(self, params) -> None:
    self.feature_fn(params["encoder"]).compile_ahead(
        _placed(params["encoder"], self.mesh), self.mesh, self.config.eval_batch_size,
        self.config.model.image_size)

  def splits(self) -> List[str]:
    return list(dict.fromkeys(
        [self.spec["train_split"]] + ([self.spec["val_split"]] if self.spec["val_split"]
                                      else []) + [self.split]))

  def run(self, params) -> base.Result:
    spec = self.spec
    feats = encoder_features(self.config, params["encoder"], self.splits(), self.mesh,
                             self.data_dir, self.progress, self.feature_fn(params["encoder"]))
    train, subset = feats[spec["train_split"]], None
    if float(spec["train_fraction"]) != 1.0:
      subset = input_pipeline.train_subset(self.data_dir, spec["train_split"],
                                           float(spec["train_fraction"]), self.config.seed)
      train = {k: v[subset.indices] for k, v in train.items()}
    mean = train["features"].mean(axis=0)
    std = train["features"].std(axis=0) + 1e-6
    for f in feats.values():
      f["features"] = (f["features"] - mean) / std
    num_classes = self.info.num_classes
    targets = train["labels"] if self.multi else np.eye(num_classes)[train["label"]]
    select = feats[spec["val_split"] or self.split]
    best = None
    for wd in spec["weight_decays"]:
      w, b = train_linear(train["features"], targets, self.multi, int(spec["steps"]),
                          float(spec["lr"]), float(wd), self.config.seed)
      result = reports.report(_scores(select["features"], w, b, self.multi), select,
                               self.info)
      logging.info("%s: weight decay %g: %s %s %.4f", self.field, wd,
                   spec["val_split"] or self.split, "mAP" if self.multi else "top-1",
                   metrics.headline(result))
      if best is None or metrics.headline(result) > metrics.headline(best[2]):
        best = (w, b, result, wd)
    w, b, selected, wd = best
    test = feats[self.split]
    report = reports.report(_scores(test["features"], w, b, self.multi), test, self.info)
    report.update(weight_decay=float(wd), split=self.split,
                  selected_on=spec["val_split"] or self.split)
    if subset is not None:
      report["train_subset"] = subset.summary()
    scalars = base.float_scalars(report)
    del scalars["weight_decay"]
    if spec["val_split"]:
      report["val"] = scalars["val"] = metrics.headline(selected)
    return base.Result(scalars, report)

"""Classification fine-tuning (docs/method.md §5) as a task of the shared training loop.

Encoder from a pretrained checkpoint (config.init.encoder through an importer), global-average
pooled head, layer-wise lr decay on the encoder blocks, drop path; on the host RandAugment,
on device (inside the step) random erasing, mixup/cutmix and label smoothing; softmax
cross-entropy, or binary cross-entropy for multi-label data (EMOTIC).

Validation is an ordinary evaluator ("validation": classification on config.data.eval_split,
every `config.eval_every_epochs`) with a keep-best policy (`KeepBest`): the best state goes to
WORKDIR/best (with WORKDIR/best.json), apart from the latest checkpoints. At the end, the
config's "classification" evaluator (config.test_split) scores the best state, its report in
WORKDIR/evaluations/best-<step>/classification/ like any evaluation of that checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Dict, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import input_pipeline
from data_pipelines import storage
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import datasets
from uniemox_jax import importers
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax import optim
from uniemox_jax import trainer
from uniemox_jax.evaluators import base as evaluators_base
from uniemox_jax.evaluators import classification
from uniemox_jax.evaluators import reports
from uniemox_jax.models import classifier
from uniemox_jax.models import hf_backbone
from uniemox_jax.models import surgery
from uniemox_jax.models import vit

BEST_DIR, BEST_FILE = "best", "best.json"
VALIDATION, TEST = "validation", "classification"


def classification_loss(model, aug, num_classes: int, multi_label: bool, params, constants,
                        batch, key):
  """The fine-tuning objective on a uint8 batch: normalize, random erasing, label smoothing
  (single-label), mixup/cutmix, then softmax (or, multi-label, sigmoid) cross-entropy.
  `aug` is config.augment; there are no step constants. Returns (loss, {"loss": loss})."""
  del constants
  k_erase, k_mix, k_drop = jax.random.split(key, 3)
  images = augment.random_erasing(k_erase, augment.normalize(batch["image"]), aug.erase_prob)
  if multi_label:
    targets = batch["labels"].astype(jnp.float32)
  else:
    targets = augment.smooth_targets(batch["label"], num_classes, aug.label_smoothing)
  if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
    images, targets = augment.mixup_cutmix(
        k_mix, images, targets, mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
        switch_prob=aug.switch_prob, prob=aug.mix_prob)
  logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": k_drop})
  if multi_label:
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
  else:
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
  return loss, {"loss": loss}


class KeepBest:
  """The best validation state so far: saved to WORKDIR/best (one step) and described in
  WORKDIR/best.json (step, headline value, split, report) whenever the validation headline
  (top-1, or mAP) improves. Read once at start: afterwards every process updates it from the
  same (gathered) evaluation, so they agree on when to save without reading a file process 0
  rewrites."""

  def __init__(self, workdir: str, split: str, meta: Dict[str, Any],
               steps_per_epoch: int = 0):
    self.workdir, self.split, self.meta = workdir, split, meta
    self.steps_per_epoch = steps_per_epoch
    self.store = checkpointing.Checkpointer(storage.join(workdir, BEST_DIR), keep=1,
                                            asynchronous=False)
    self.best = read_best(workdir)

  def __call__(self, step: int, name: str, result, state) -> Dict[str, float]:
    if name != VALIDATION:
      return {}
    value = metrics.headline(result.report)
    if value > self.best["value"]:
      if step not in self.store.all_steps():   # a rerun after a crash re-evaluates the same
        self.store.save(step, {"step": state["step"], "params": state["params"]},
                        meta=self.meta)
      self.best = {"step": step, "value": value, "split": self.split, "report": result.report}
      if self.steps_per_epoch:
        self.best["epoch"] = step / self.steps_per_epoch
      if jax.process_index() == 0:
        storage.write_text(storage.join(self.workdir, BEST_FILE),
                           json.dumps(self.best, indent=2))
    return {f"{VALIDATION}/best": self.best["value"]}


def test_report_file(workdir: str, best_step: int, split: str) -> str:
  """Where a finished run's test report of its best state is (`after_training` writes it)."""
  return storage.join(reports.out_dir(storage.join(workdir, BEST_DIR, str(best_step))), TEST,
                      f"{split}_results.json")


def read_best(workdir: str) -> Dict[str, Any]:
  return storage.read_json(storage.join(workdir, BEST_FILE),
                           missing={"step": 0, "value": float("-inf")})


def step_task(config, num_classes: int, multi_label: bool) -> trainer.Task:
  """The task as the step sees it, without data: the classifier, its loss, the batch's
  entries, the pretrained encoder and layer-wise lr decay. `make_task` adds the data,
  validation and the final test; `uniemox_jax.aot` compiles it as it is."""
  model = models.classification_model(config.model, num_classes)
  size = config.model.image_size
  backbone = config.model.get("backbone", "")
  if backbone:
    if config.init.encoder:
      raise ValueError(f"config.model.backbone={backbone!r} starts from its own weights; "
                       f"config.init.encoder ({config.init.encoder!r}) must be empty")
    if config.optim.layer_decay < 1.0:
      raise ValueError(f"config.optim.layer_decay={config.optim.layer_decay} numbers this "
                       "codebase's ViT blocks; a transformers backbone (config.model.backbone) "
                       "has no such layers: set --config.optim.layer_decay=1.0")

  def init(key):
    return model.init({"params": key, "dropout": key},
                      jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  def load_pretrained(params: Dict[str, Any]) -> Dict[str, Any]:
    if backbone:
      variables, fit = surgery.fit(hf_backbone.load_variables(backbone), params["backbone"],
                                   prefix="backbone/", source_name=backbone)
      fit.check(f"the backbone {backbone!r}")
      logging.info("Fine-tuning the backbone %s: %s", backbone, fit.summary())
      return dict(params, backbone=variables)
    encoder = importers.import_encoder(config, params["encoder"])
    params, load_report = classifier.load_encoder_params(params, encoder)
    logging.info("Fine-tuning from %s: %s", config.init.encoder, load_report.summary())
    return params

  def lr_multipliers(params):
    if config.optim.layer_decay >= 1.0:
      return None
    return optim.layerwise_multipliers(params, vit.decode_variant(config.model.variant).depth,
                                       config.optim.layer_decay)

  labels = {"labels": ((num_classes,), np.float32)} if multi_label else {
      "label": ((), np.int32)}
  loss = functools.partial(classification_loss, model, config.augment, num_classes,
                           multi_label)
  return trainer.Task(
      init=init, loss=loss, dataset=None,
      example={"image": ((size, size, 3), np.uint8), **labels}, loss_name="loss",
      reads=evaluators_base.CLASSIFIER, meta={"task": "finetune"},
      load_pretrained=load_pretrained, lr_multipliers=lr_multipliers,
      own_weights=bool(backbone))


def make_task(setup: trainer.Setup) -> Optional[trainer.Task]:
  config, info = setup.config, setup.info
  with setup.checks.check():
    datasets.check_dataset(config, info)
  with setup.checks.check():
    info.check_splits(setup.data_dir, {
        split: field for field, split in (("config.test_split", config.test_split),
                                          ("config.data.eval_split", config.data.eval_split))
        if split})
  if setup.checks.errors:
    return None          # what follows would only restate them; `trainer.build` reports them
  names, multi = list(info.class_names), info.multi_label
  dataset = input_pipeline.finetune_dataset(
      setup.data_dir, config.data.split, batch_size=setup.local_batch,
      image_size=config.model.image_size, rand_augment=config.augment.rand_augment,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      draft_decode=config.data.draft_decode, subset=setup.subset)
  eval_every = config.eval_every_steps or max(
      1, int(round(config.eval_every_epochs * setup.schedule.steps_per_epoch)))
  validation = classification.Classification(
      VALIDATION, {"type": "classification", "split": config.data.eval_split,
                   "data": setup.data_dir, "period": eval_every},
      config, setup.workdir, setup.mesh)
  meta = {"task": "finetune", "dataset": config.dataset, "class_names": names,
          "multi_label": multi}
  if setup.subset is not None:
    meta["train_subset"] = setup.subset.summary()
  keep_best = KeepBest(setup.workdir, config.data.eval_split, meta,
                       setup.schedule.steps_per_epoch)

  def after_training(loop: trainer.TrainLoop) -> Dict[str, Any]:
    """The best state's report on config.test_split (none without one)."""
    best = {k: v for k, v in read_best(setup.workdir).items() if k != "report"}
    if not config.test_split:
      return {"best": best}
    ckpt = checkpointing.Checkpoint.open(storage.join(setup.workdir, BEST_DIR))
    test = classification.Classification(
        TEST, dict(config.evals[TEST], split=config.test_split, data=setup.data_dir,
                   period=0), config, setup.workdir, setup.mesh)
    result = test.run(ckpt.read(("params",)))
    result.report.update(checkpoint=ckpt.step_dir, split=config.test_split)
    if setup.subset is not None:
      result.report["train_subset"] = setup.subset.summary()
    files = test.write(result, reports.out_dir(ckpt.step_dir), at=ckpt.label)
    return {"best": best, "test": dict(result.report, files=files)}

  return dataclasses.replace(
      step_task(config, len(names), multi), dataset=dataset, meta=meta,
      check_checkpoint=lambda ckpt: classification.check_classes(ckpt, info),
      evaluators={VALIDATION: validation}, on_evaluation=keep_best,
      after_training=after_training, close=keep_best.store.close)


def finetune(config, workdir: str) -> Dict[str, Any]:
  """Fine-tunes, then (with config.test_split) evaluates the best state on the test split;
  returns the last training metrics, the best validation value and the test report."""
  return trainer.train(config, workdir, make_task)

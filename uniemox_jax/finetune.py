"""Classification fine-tuning (docs/method.md §5) on the shared training loop.

Encoder from a pretrained checkpoint (config.init.encoder through an importer), global-average
pooled head, layer-wise lr decay on the encoder blocks, drop path; on the host RandAugment,
on device (inside the step) random erasing, mixup/cutmix and label smoothing; softmax
cross-entropy, or binary cross-entropy for multi-label data (EMOTIC). Validation runs every
`config.eval_every_epochs`; the best validation state is kept in WORKDIR/best (with
WORKDIR/best.json), apart from the latest checkpoints in WORKDIR/checkpoints.
"""
from __future__ import annotations

import json
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import optax

from data_pipelines import input_pipeline
from data_pipelines import storage
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import datasets
from uniemox_jax import evaluate
from uniemox_jax import evaluators
from uniemox_jax import importers
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax import optim
from uniemox_jax import trainer
from uniemox_jax.models import classifier
from uniemox_jax.models import vit

BEST_DIR, BEST_FILE = "best", "best.json"


def classification_loss(model, aug, num_classes: int, multi_label: bool, params, batch, key):
  """The fine-tuning objective on a uint8 batch: normalize, random erasing, label smoothing
  (single-label), mixup/cutmix, then softmax (or, multi-label, sigmoid) cross-entropy.
  `aug` is config.augment. Returns (loss, {"loss": loss})."""
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


class FinetuneTrainer(trainer.TrainLoop):
  """One fine-tuning run; `run()` trains, validating and keeping the best state."""
  LOSS = "loss"
  reads = evaluators.base.CLASSIFIER

  def check_data(self) -> None:
    datasets.check_dataset(self.config, self.info)

  def setup(self):
    config = self.config
    self.class_names = list(self.info["class_names"])
    self.multi_label = bool(self.info.get("multi_label"))
    self.model = models.classification_model(config.model, len(self.class_names))
    self.dataset = input_pipeline.finetune_dataset(
        self.data_dir, config.data.split, batch_size=self.local_batch,
        image_size=config.model.image_size, rand_augment=config.augment.rand_augment,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(),
        draft_decode=config.data.get("draft_decode", True))
    # Validation: the classification evaluator on config.data.eval_split.
    self.validator = evaluators.Classification(
        "validation", {"type": "classification", "split": config.data.eval_split,
                       "data": self.data_dir}, config, self.workdir, self.mesh)
    self.eval_every = config.get("eval_every_steps", 0) or max(
        1, int(round(config.eval_every_epochs * self.schedule.steps_per_epoch)))
    self.best = checkpointing.Checkpointer(storage.join(self.workdir, BEST_DIR), keep=1,
                                           asynchronous=False)
    # Read once: afterwards every process updates it from the same (gathered) evaluation, so
    # they agree on when to save the best state without reading a file process 0 rewrites.
    self._best = self.best_so_far()

  def init_params(self, key):
    size = self.config.model.image_size
    return self.model.init({"params": key, "dropout": key},
                           jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  def batch_keys(self, host_batch):
    return ["image", "labels" if self.multi_label else "label"]

  def required_splits(self) -> Dict[str, str]:
    splits = super().required_splits()
    splits.setdefault(self.config.data.eval_split, "config.data.eval_split")
    if self.config.get("test_split"):
      splits.setdefault(self.config.test_split, "config.test_split")
    return splits

  def check_checkpoint(self, step_dir: str) -> None:
    """A resumed or explicit checkpoint must have this dataset's head and classes."""
    evaluate.check_classes(step_dir, self.info)

  def lr_multipliers(self, params):
    decay = self.config.optim.get("layer_decay", 1.0)
    if decay >= 1.0:
      return None
    depth = vit.decode_variant(self.config.model.variant).depth
    return optim.layerwise_multipliers(params, depth, decay)

  def loss_fn(self, params, consts, batch, key):
    del consts
    return classification_loss(self.model, self.config.augment, len(self.class_names),
                               self.multi_label, params, batch, key)

  def from_pretrained(self, state):
    host = jax.device_get(state["params"])
    encoder = importers.import_encoder(self.config, host["encoder"])
    params, load_report = classifier.load_encoder_params(host, encoder)
    logging.info("Fine-tuning from %s: %s", self.config.init.encoder, load_report.summary())
    return dict(state, params=self.place_params(params))

  def checkpoint_meta(self) -> Dict[str, Any]:
    return {"task": "finetune", "dataset": self.config.get("dataset", ""),
            "class_names": self.class_names, "multi_label": self.multi_label}

  # --- validation and the best state ------------------------------------------------------

  def best_so_far(self) -> Dict[str, Any]:
    path = storage.join(self.workdir, BEST_FILE)
    if not storage.exists(path):
      return {"step": 0, "value": float("-inf")}
    return json.loads(storage.read_text(path))

  def after_step(self, step: int, state) -> Dict[str, float]:
    if step % self.eval_every and step != self.schedule.total_steps:
      return {}
    split = self.config.data.eval_split
    evaluation = self.validator.run(state["params"])
    result = evaluation.report
    value = metrics.headline(result)
    best = self._best
    if value > best["value"]:
      if step not in self.best.all_steps():   # a rerun after a crash re-evaluates the same
        self.best.save(step, {"step": state["step"], "params": state["params"]},
                       meta=self.checkpoint_meta())
      best = self._best = {"step": step, "value": value, "split": split, "report": result}
      if jax.process_index() == 0:
        storage.write_text(storage.join(self.workdir, BEST_FILE), json.dumps(best, indent=2))
    scalars = {f"{split}_{k}": v for k, v in evaluation.scalars.items()}
    scalars[f"best_{split}"] = best["value"]
    return scalars

  def close(self) -> None:
    super().close()
    self.best.close()


def finetune(config, workdir: str) -> Dict[str, Any]:
  """Fine-tunes, then (with config.test_split) evaluates the best state on the test split;
  returns the last training metrics, the best validation value and the test report."""
  t = FinetuneTrainer(config, workdir)
  try:
    last = t.run()
  finally:
    t.close()
  result = {"train": last, "best": {k: v for k, v in t.best_so_far().items() if k != "report"}}
  if config.get("test_split"):
    result["test"] = evaluate.evaluate_checkpoint(
        config, storage.join(workdir, BEST_DIR), config.test_split, workdir)
  return result

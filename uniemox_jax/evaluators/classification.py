"""A fine-tuned classifier on one split: every example counted exactly once, the report of
`reports.report` (top-1/top-3, per-class accuracy, macro F1, confusion matrix; mAP and
per-class AP for multi-label data). Also what every classifier checkpoint needs: its classes
checked against the data, its pooling as recorded, its parameters placed on the mesh."""
from __future__ import annotations

import copy
import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from data_pipelines import dataset_info
from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import models
from uniemox_jax import sharding
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import reports


def check_classes(ckpt: checkpointing.Checkpoint, info: dataset_info.DatasetInfo) -> None:
  """The checkpoint's head must predict this dataset's classes (by count, and by name when
  the checkpoint recorded them)."""
  names = list(info.class_names)
  head = ckpt.params.get("head")
  if head is None:
    raise errors.UserError(f"{ckpt.step_dir} has no classification head (params/head): it is "
                           "not a fine-tuned checkpoint; use --config.init.encoder to "
                           "fine-tune from it")
  width = head["kernel"].shape[-1]
  if width != len(names):
    raise errors.UserError(f"{ckpt.step_dir}: the head predicts {width} classes but the "
                           f"dataset {info.name} has {len(names)} ({names})")
  saved = ckpt.meta.get("class_names")
  if saved is not None and list(saved) != names:
    raise errors.UserError(f"{ckpt.step_dir} was trained on classes {saved}, the dataset has "
                           f"{names}")


def with_checkpoint_pool(config, ckpt: checkpointing.Checkpoint):
  """`config`, or a copy whose model pools as the checkpoint records (an imported timm ViT
  classifies its CLS token: `pool` "token"; see models/classifier.py)."""
  pool = ckpt.meta.get("pool")
  if pool is None or pool == config.model.pool:
    return config
  logging.info("%s pools %r (recorded in the checkpoint); config.model.pool set to it",
               ckpt.step_dir, pool)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.pool = pool
  return config


def classifier_scorer(model, multi_label: bool):
  """A jitted (params, device batch) -> {"scores"}: softmax probabilities, or per-class
  sigmoids for multi-label data. Keep one per model: jit caches by function."""
  @jax.jit
  def fn(params, batch):
    logits, _ = model.apply({"params": params}, augment.normalize(batch["image"]), train=False)
    return {"scores": jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)}
  return fn


def place_classifier(model, params, mesh, image_size: int, what: str = "the checkpoint"):
  """Host params -> global arrays with the model's logical shardings; a tree that does not
  fit the model the config builds is refused with every differing array named."""
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
  built = (f"backbone {model.source!r}" if hasattr(model, "source") else
           f"variant {model.variant}, pos_embed {model.pos_embed!r}, pool {model.pool!r}")
  params = models.check_params(params, nn.unbox(abstract), f"{what} (config.model: {built})")
  shardings = sharding.param_shardings(abstract, mesh)
  return sharding.host_to_global(params, shardings)


class Classification(base.Evaluator):
  reads = base.CLASSIFIER

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.model = models.classification_model(self.config.model, self.info.num_classes)
    # One scorer for the evaluator's life: a run evaluating every epoch compiles once.
    self.scorer = gathering.EvalStep(classifier_scorer(self.model, self.info.multi_label),
                                     self.field)

  def compile_ahead(self, params) -> None:
    self.scorer.compile_ahead(params, self.mesh, self.config.eval_batch_size,
                              self.config.model.image_size)

  def check_checkpoint(self, ckpt: checkpointing.Checkpoint) -> None:
    super().check_checkpoint(ckpt)
    check_classes(ckpt, self.info)

  def run(self, params) -> base.Result:
    """The report on the split; host params (a checkpoint read by the command) are placed
    with the model's shardings first, their tree checked against the model's."""
    size = self.config.model.image_size
    dataset = input_pipeline.eval_dataset(
        self.data_dir, self.split, batch_size=self.batch_size, image_size=size,
        process_index=jax.process_index(), process_count=jax.process_count())
    if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
      params = place_classifier(self.model, params, self.mesh, size, what="the parameters")
    outputs = gathering.gather_split(functools.partial(self.scorer, params), dataset, self.mesh,
                                     progress=self.progress, description=f"eval {self.split}")
    report = reports.report(outputs.pop("scores"), outputs, self.info)
    return base.Result(base.float_scalars(report), report)

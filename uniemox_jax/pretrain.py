"""UniEmoX pretraining (docs/method.md §1-4) as a task of the shared training loop: the main job.

The frozen CLIP teacher's parameters are a step constant, placed once, replicated; only the
UniEmoX parameters are differentiated, through `uniemox_jax.objective`, which composes the
losses from the model's outputs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import importers
from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax import trainer
from uniemox_jax.evaluators import base as evaluators_base
from uniemox_jax.teacher import clip
from uniemox_jax.teacher import loading


def pretraining_loss(model, objective_fn: objective.Objective, teacher, params, teacher_params,
                     batch, key):
  """The step's loss on a uint8 batch: normalized views through `objective_fn` (the teacher
  under stop_gradient, the model, L1 + L2 + L3). Returns (total, every term)."""
  batch = dict(batch, scene=augment.normalize(batch["scene"]),
               person=augment.normalize(batch["person"]))
  terms, _ = objective_fn(model, params, teacher, teacher_params, batch, key)
  return terms[objective.TOTAL], terms


def step_task(config, mesh, teacher: clip.ClipTeacher,
              text_emb_dim: Optional[int]) -> trainer.Task:
  """The task as the step sees it, without data: the model, the objective, the teacher's
  weights as constants, the batch's entries (text embeddings of `text_emb_dim` when the data
  carries them, else token ids). `make_task` adds the data; `uniemox_jax.aot` compiles it."""
  model = models.pretrain_model(config.model)
  objective_fn = objective.from_config(config.model,
                                       config.batch_size // config.optim.accum_steps,
                                       mesh.devices.size)
  objective.check_compatible(model, teacher)
  size = config.model.image_size

  def init(key):
    img = jnp.zeros((2, size, size, 3), jnp.float32)
    return model.init({"params": key, "mask": key, "dropout": key}, img, img,
                      decode=objective_fn.reconstructs)["params"]

  def load_pretrained(params: Dict[str, Any]) -> Dict[str, Any]:
    encoder = importers.import_encoder(config, params["encoder"])
    return dict(params, encoder=models.check_params(encoder, params["encoder"],
                                                    "config.init.encoder"))

  image = ((size, size, 3), np.uint8)
  text = {"text_emb": ((text_emb_dim,), np.float32)} if text_emb_dim else {
      k: ((clip.MAX_TEXT_TOKENS,), np.int32) for k in ("input_ids", "attention_mask")}
  loss = functools.partial(pretraining_loss, model, objective_fn, teacher)
  return trainer.Task(init=init, loss=loss, dataset=None,
                      example={"scene": image, "person": image, **text},
                      loss_name=objective.TOTAL, reads=evaluators_base.PRETRAIN,
                      meta={"task": "pretrain"}, constants=teacher.params, teacher=teacher,
                      load_pretrained=load_pretrained)


def make_task(setup: trainer.Setup) -> trainer.Task:
  config = setup.config
  teacher = loading.load_teacher(config, setup.workdir)
  task = step_task(config, setup.mesh, teacher, setup.info.text_emb_dim)
  # Without stored text embeddings, the pipeline tokenizes each record's prompt.
  tokenize = None if setup.info.text_emb_dim else functools.partial(clip.tokenize_one,
                                                                     teacher.tokenizer)
  return dataclasses.replace(task, dataset=input_pipeline.pretrain_dataset(
      setup.data_dir, config.data.split, batch_size=setup.local_batch,
      image_size=config.model.image_size, person_view=config.data.person_view,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      tokenize=tokenize, draft_decode=config.data.draft_decode, subset=setup.subset),
      meta=dict(task.meta, **({"train_subset": setup.subset.summary()} if setup.subset else {})))


def pretrain(config, workdir: str) -> Dict[str, Any]:
  """Pretrains; returns the last logged metrics."""
  return trainer.train(config, workdir, make_task)["train"]

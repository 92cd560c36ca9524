"""UniEmoX pretraining (docs/method.md §1-4) on the shared training loop: the main job.

The frozen CLIP teacher's parameters are a step constant, placed once, replicated; only the
UniEmoX parameters are differentiated through `uniemox_jax.objective`, which composes the
losses from the model's outputs.
"""
from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import importers
from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax import sharding
from uniemox_jax import trainer
from uniemox_jax.teacher import clip
from uniemox_jax.teacher import loading


class PretrainTrainer(trainer.TrainLoop):
  """Everything one pretraining run holds; `run()` trains to the schedule's last step."""
  LOSS = objective.TOTAL

  def setup(self):
    config = self.config
    accum = config.optim.get("accum_steps", 1)
    self.model = models.pretrain_model(config.model)
    self.objective = objective.from_config(config.model, config.batch_size // accum,
                                           self.mesh.devices.size)
    self.teacher = loading.load_teacher(config, self.workdir)
    objective.check_compatible(self.model, self.teacher)
    tokenize = None
    if not self.info.get("text_emb_dim"):
      tokenize = functools.partial(clip.tokenize_one, self.teacher.tokenizer)
    self.dataset = input_pipeline.pretrain_dataset(
        self.data_dir, config.data.split, batch_size=self.local_batch,
        image_size=config.model.image_size, person_view=config.data.person_view,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), tokenize=tokenize,
        draft_decode=config.data.get("draft_decode", True))

  def init_params(self, key):
    size = self.config.model.image_size
    img = jnp.zeros((2, size, size, 3), jnp.float32)
    return self.model.init({"params": key, "mask": key, "dropout": key}, img, img,
                           decode=self.objective.reconstructs)["params"]

  def constants(self):
    return sharding.host_to_global(self.teacher.params, self.replicated)

  def batch_keys(self, host_batch):
    keys = ["scene", "person"]
    keys += ["text_emb"] if "text_emb" in host_batch else ["input_ids", "attention_mask"]
    missing = [k for k in keys if k not in host_batch]
    if missing:
      raise KeyError(f"pretraining batches lack {missing}: convert the data with "
                     "--text_embeddings, or give the pipeline a tokenizer")
    return keys

  def loss_fn(self, params, teacher_params, batch, key):
    batch = dict(batch, scene=augment.normalize(batch["scene"]),
                 person=augment.normalize(batch["person"]))
    terms, _ = self.objective(self.model, params, self.teacher, teacher_params, batch, key)
    return terms[objective.TOTAL], terms

  def from_pretrained(self, state):
    template = jax.device_get(state["params"]["encoder"])
    encoder = importers.import_encoder(self.config, template)
    models.check_params(encoder, template, "config.init.encoder")
    return dict(state, params=self.place_params(dict(state["params"], encoder=encoder)))


def pretrain(config, workdir: str) -> Dict[str, float]:
  return trainer.train(PretrainTrainer(config, workdir))

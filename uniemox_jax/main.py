r"""Entry point: `python -m uniemox_jax.main --config configs/demo.py --workdir DIR`.

Until the pretraining trainer lands, this runs one jitted forward and backward pass of the
configured UniEmoX with its CLIP teacher on a small batch built in memory (random pixels,
EmoSet-style prompts embedded by the teacher) and prints the losses. The resolved config is
logged and written to WORKDIR/config.json.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
from ml_collections import config_flags
import numpy as np
import optax

from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax.teacher import clip
from uniemox_jax.teacher import prompts
from uniemox_jax.teacher import tiny

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs.")

MIKELS = ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")


def load_teacher(config, workdir: str) -> clip.ClipTeacher:
  """The teacher named by config.teacher; with `tiny`, one made once in WORKDIR/tiny_clip."""
  name = config.teacher.name
  if config.teacher.tiny:
    name = os.path.join(workdir, "tiny_clip")
    if not os.path.exists(os.path.join(name, "flax_model.msgpack")):
      tiny.make_tiny_clip(name, embed_dim=config.model.decoder.width, seed=config.seed)
  return clip.ClipTeacher.load(name, dtype=models.dtype(config.teacher.dtype,
                                                        "config.teacher.dtype"),
                               normalization=config.teacher.normalization)


def demo_batch(teacher: clip.ClipTeacher, config, rng: np.random.Generator) -> dict:
  size, batch = config.model.image_size, config.batch_size
  labels = rng.integers(0, len(MIKELS), batch)
  texts = [prompts.build_prompt(MIKELS[y], {"scene": "street", "objects": ["person", "car"]})
           for y in labels]
  images = rng.standard_normal((2, batch, size, size, 3)).astype(np.float32)
  return {"scene": images[0], "person": images[1], "text_emb": teacher.embed_texts(texts),
          "label": labels.astype(np.int32)}


def forward_demo(config, workdir: str) -> dict:
  """One forward + backward pass; returns the losses and the gradient norm as floats."""
  model = models.pretrain_model(config.model)
  teacher = load_teacher(config, workdir)
  objective.check_compatible(model, teacher)
  batch = demo_batch(teacher, config, np.random.default_rng(config.seed))
  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  t = objective.teacher_outputs(teacher, teacher.params, batch)
  variables = jax.jit(lambda k: model.init(
      {"params": k, "mask": k, "dropout": k}, batch["scene"], batch["person"], t["text_emb"],
      t["image_emb"], t["logit_scale"]))(init_key)
  params = nn.unbox(variables["params"])

  @jax.jit
  def step(params, teacher_params, batch, key):
    def loss_fn(p):
      terms, _ = objective.pretrain_losses(model, p, teacher, teacher_params, batch, key)
      return terms["total"], terms
    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return terms, optax.global_norm(grads)

  terms, grad_norm = step(params, teacher.params, batch, step_key)
  out = {k: float(v) for k, v in terms.items()}
  out["grad_norm"] = float(grad_norm)
  return out


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required")
  os.makedirs(workdir, exist_ok=True)
  logging.info("Config:\n%s", config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info("Devices: %s", jax.devices())
  result = forward_demo(config, workdir)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)

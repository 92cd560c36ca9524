"""The CLIP teacher a config names, for training and evaluation alike."""
from __future__ import annotations

import os

import jax

from data_pipelines import storage
from uniemox_jax import distributed
from uniemox_jax import models
from uniemox_jax.teacher import clip
from uniemox_jax.teacher import tiny


def load_teacher(config, workdir: str) -> clip.ClipTeacher:
  """The teacher named by config.teacher; with `tiny`, one made once in WORKDIR/tiny_clip."""
  name = config.teacher.name
  if config.teacher.tiny:
    name = os.path.join(workdir, "tiny_clip")
    maker = jax.process_index() == 0
    if storage.is_remote(workdir):    # made on every host, from the seed, in its local cache
      name = os.path.join(storage.cache_dir(), "tiny_clip",
                          f"seed{config.seed}-w{config.model.decoder.width}-p{jax.process_index()}")
      maker = True
    if maker and not os.path.exists(os.path.join(name, "flax_model.msgpack")):
      tiny.make_tiny_clip(name, embed_dim=config.model.decoder.width, seed=config.seed)
    distributed.barrier("tiny teacher written")
  return clip.ClipTeacher.load(name, dtype=models.dtype(config.teacher.dtype,
                                                        "config.teacher.dtype"),
                               normalization=config.teacher.normalization,
                               impl=config.teacher.impl, attention=config.teacher.attention)

"""The CLIP teacher a config names, for training and evaluation alike, or as shapes alone for
a step compiled ahead of time."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from data_pipelines import storage
from uniemox_jax import distributed
from uniemox_jax import models
from uniemox_jax.teacher import clip
from uniemox_jax.teacher import clip_vision
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
                               impl=config.teacher.impl, attention=config.teacher.attention,
                               scan=config.teacher.scan)


# The image towers of the hub ids the configs name: a step is compiled ahead of time on hosts
# that may have neither the weights nor the network.
KNOWN_TOWERS = {"openai/clip-vit-base-patch16": clip_vision.VisionConfig()}


def teacher_shapes(config, workdir: str) -> clip.ClipTeacher:
  """The teacher of `config.teacher` with its image tower's weights as shapes only, for a step
  compiled ahead of time (`uniemox_jax.aot`). The tiny teacher is the one `load_teacher`
  makes (in WORKDIR); another is the fused tower (config.teacher.impl "fused") of the
  numbers in its folder's config.json, or in the hub cache's, or known here (KNOWN_TOWERS).
  The text tower is left out: the data must carry text embeddings."""
  if config.teacher.tiny:
    return load_teacher(config, workdir)
  name = config.teacher.name
  if config.teacher.impl != "fused":
    raise ValueError(f"config.teacher.impl={config.teacher.impl!r}: only the fused teacher "
                     "(impl 'fused', the same outputs) is compiled from shapes alone")
  local = os.path.join(os.path.expanduser(name), "config.json")
  if os.path.isfile(local):
    with open(local) as f:
      vision = clip_vision.VisionConfig.from_clip_config(json.load(f))
  elif name in KNOWN_TOWERS:
    vision = KNOWN_TOWERS[name]
  else:
    try:
      from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
      vision = clip_vision.VisionConfig.from_clip_config(
          CLIPConfig.from_pretrained(name, local_files_only=True))
    except OSError:
      raise FileNotFoundError(
          f"config.teacher.name={name!r}: its architecture is unknown here (no config.json in "
          f"that folder, in the hub cache, or among {sorted(KNOWN_TOWERS)})") from None
  size = vision.image_size
  tower = clip_vision.ClipVisionTower(vision, scan=config.teacher.scan)
  params = jax.eval_shape(tower.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
  return clip.ClipTeacher.from_vision_tower(
      vision, params, dtype=models.dtype(config.teacher.dtype, "config.teacher.dtype"),
      normalization=config.teacher.normalization, attention=config.teacher.attention,
      scan=config.teacher.scan)

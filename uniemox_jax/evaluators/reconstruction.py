r"""What the pretrained model reconstructs: a grid of fixed images.

One row per image (the first `num` records of the split, eval crop): the scene view, the view
as the encoder sees it (removed patches grey), and the reconstruction (the decoder's
prediction in the removed patches, the visible ones as given). The mask is drawn from a fixed
key, so grids of different steps of a run compare like with like. With norm_pix_loss the
prediction is per-patch normalized; it is shown with the true patch's mean and variance, as
MAE's visualization does. The grid is a PNG (OUT/<name>/reconstruction_<split>.png) and, in a
training run, a TensorBoard image; the logged scalar is `pixel_error`, the mean absolute error
(0-255) of the reconstruction over the removed pixels.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import errors
from uniemox_jax import losses
from uniemox_jax import models
from uniemox_jax import sharding
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import reports
from uniemox_jax.models import decoder as decoder_lib
from uniemox_jax.models import vit

GREY = 128


def fixed_images(data_dir: str, split: str, num: int, image_size: int) -> Dict[str, np.ndarray]:
  """The first `num` records of `split` through the eval transform: {"image", "person"}
  uint8 [num, S, S, 3]."""
  source = input_pipeline.ShardSource(data_dir, split)
  if len(source) == 0:
    raise errors.UserError(f"split {split!r} of {data_dir} is empty")
  transform = input_pipeline.EvalTransform(image_size, person_view=True)
  examples = [transform.map(source[i]) for i in range(min(num, len(source)))]
  return {k: np.stack([e[k] for e in examples]) for k in ("image", "person")}


def reconstructor(model, seed: int = 0, mesh=None, name: str = "the reconstruction"
                  ) -> Callable[..., Dict[str, np.ndarray]]:
  """(params, scene, person) -> {"original", "masked", "reconstruction"}: uint8 [N, S, S, 3]
  images of one masked pass, and "removed": bool [N, S, S], the pixels of the patches the mask
  removed. Compiled once: call it every period. With a `mesh` the images are replicated over
  it and so are the outputs, so every process of a multi-process run can read them."""
  patch = vit.decode_variant(model.variant).patch
  mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
  std = np.asarray(augment.IMAGENET_STD, np.float32)

  replicated = sharding.replicated(mesh) if mesh is not None else None

  @functools.partial(jax.jit, out_shardings=replicated)
  def masked_pass(p, scene_u8, person_u8):
    x = augment.normalize(scene_u8)
    key = jax.random.key(seed)
    out = model.apply({"params": p}, x, augment.normalize(person_u8), train=False,
                      rngs={"mask": key, "dropout": key})
    pred = out["prediction"].astype(jnp.float32)
    patches = decoder_lib.patchify(x, patch)
    if model.norm_pix_loss:     # back to pixels with the true patch's statistics
      p_mean, p_scale = losses.patch_statistics(patches)
      pred = pred * p_scale + p_mean
    mask = out["mask"][..., None].astype(jnp.float32)
    return patches, mask, pred
  run = gathering.EvalStep(masked_pass, name)

  def to_uint8(p):
    img = np.asarray(decoder_lib.unpatchify(jnp.asarray(p), patch))
    return np.clip(np.round((img * std + mean) * 255.0), 0, 255).astype(np.uint8)

  def placed(scene, person):
    return (scene, person) if replicated is None else sharding.host_to_global(
        (scene, person), replicated)

  def apply(params, scene: np.ndarray, person: np.ndarray) -> Dict[str, np.ndarray]:
    scene, person = placed(scene, person)
    patches, mask, pred = (np.asarray(a) for a in jax.device_get(run(params, scene, person)))
    original = to_uint8(patches)
    removed = np.asarray(decoder_lib.unpatchify(jnp.asarray(np.broadcast_to(
        mask, patches.shape)), patch)) > 0.5
    masked = np.where(removed, np.uint8(GREY), original)
    reconstruction = to_uint8(patches * (1 - mask) + pred * mask)
    return {"original": original, "masked": masked, "reconstruction": reconstruction,
            "removed": removed[..., 0]}
  # Compiles the masked pass for `params` and these images (a training run, before its
  # first step).
  apply.compile_ahead = lambda params, scene, person: run.executable(
      params, *placed(scene, person), what="ahead of the first step")
  return apply


COLUMNS = (("original", "image"), ("masked", "masked"), ("reconstruction", "reconstruction"))


def grid(panels: Dict[str, np.ndarray], title: str = "") -> np.ndarray:
  """Rows of [image | masked | reconstruction] under their column titles (`reports.image_grid`:
  cells of at least 112 px, enlarged without smoothing)."""
  return reports.image_grid([(heading, panels[key]) for key, heading in COLUMNS], title)


class Reconstruction(base.Evaluator):
  reads = base.PRETRAIN
  defaults = {"num": 4}

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if not dict(self.config.model.loss_weights).get("l3", 0.0):
      raise errors.UserError(f"{self.field}: config.model.loss_weights.l3 is 0, so the decoder "
                             "is not trained: there is no reconstruction to show")
    self.model = models.pretrain_model(self.config.model)
    self.images = fixed_images(self.data_dir, self.split, int(self.spec["num"]),
                               self.config.model.image_size)
    self.apply = reconstructor(self.model, self.config.seed, self.mesh, self.field)

  def compile_ahead(self, params) -> None:
    self.apply.compile_ahead(self.place(params), self.images["image"], self.images["person"])

  def check_checkpoint(self, ckpt) -> None:
    super().check_checkpoint(ckpt)
    if "pred" not in ckpt.params["decoder"]:
      raise errors.UserError(f"{ckpt.step_dir} was trained without the reconstruction term "
                             "(L3's weight 0), so it has no decoder head: nothing to show")

  def run(self, params) -> base.Result:
    panels = self.apply(self.place(params), self.images["image"], self.images["person"])
    removed = panels["removed"]
    error = float(np.abs(panels["reconstruction"][removed].astype(np.float32)
                         - panels["original"][removed].astype(np.float32)).mean()) \
        if removed.any() else 0.0
    title = f"mask ratio {self.config.model.mask_ratio:g}"
    return base.Result({"pixel_error": error}, {}, {"reconstruction": grid(panels, title)})

r"""What the pretrained model reconstructs: a PNG grid of fixed images, for any checkpoint.

  python -m uniemox_jax.reconstruction --config configs/demo.py \
      --checkpoint workdirs/demo/checkpoints --data workdirs/demo/synthetic [--split test] \
      [--num 4] [--out grid.png]

One row per image (the first `--num` records of the split, eval crop): the scene view, the
view as the encoder sees it (removed patches grey), and the reconstruction (the decoder's
prediction in the removed patches, the visible ones as given). The mask is drawn from a fixed
key, so grids of different steps of a run compare like with like. With norm_pix_loss the
prediction is per-patch normalized; it is shown with the true patch's mean and variance, as
MAE's visualization does. The PNG goes beside the checkpoint's evaluations
(WORKDIR/evaluations/<ckpt>-<step>/reconstruction_<split>.png) unless --out says otherwise.
"""
from __future__ import annotations

import io
from typing import Any, Dict, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import evaluate
from uniemox_jax import losses
from uniemox_jax import models
from uniemox_jax import storage
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


def reconstruct(model, params: Any, scene: np.ndarray, person: np.ndarray,
                seed: int = 0) -> Dict[str, np.ndarray]:
  """{"original", "masked", "reconstruction"}: uint8 [N, S, S, 3] images of one masked pass,
  and "removed": bool [N, S, S], the pixels of the patches the mask removed."""
  if not dict(model.loss_weights).get("l3", 0.0):
    raise errors.UserError("this model has no reconstruction term (L3's weight is 0), so its "
                           "decoder is not trained: nothing to show")
  width = model.decoder_width
  patch = vit.decode_variant(model.variant).patch

  @jax.jit
  def run(p, scene_u8, person_u8):
    x = augment.normalize(scene_u8)
    zeros = jnp.zeros((x.shape[0], width), jnp.float32)
    key = jax.random.key(seed)
    _, aux = model.apply({"params": p}, x, augment.normalize(person_u8), zeros, zeros,
                         train=False, rngs={"mask": key, "dropout": key})
    pred = aux["prediction"].astype(jnp.float32)
    patches = decoder_lib.patchify(x, patch)
    if model.norm_pix_loss:     # back to pixels with the true patch's statistics
      mean, scale = losses.patch_statistics(patches)
      pred = pred * scale + mean
    mask = aux["mask"][..., None].astype(jnp.float32)
    return patches, mask, pred

  patches, mask, pred = (np.asarray(a) for a in jax.device_get(run(params, scene, person)))
  mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
  std = np.asarray(augment.IMAGENET_STD, np.float32)

  def to_uint8(p):
    img = np.asarray(decoder_lib.unpatchify(jnp.asarray(p), patch))
    return np.clip(np.round((img * std + mean) * 255.0), 0, 255).astype(np.uint8)
  original = to_uint8(patches)
  removed = np.asarray(decoder_lib.unpatchify(jnp.asarray(np.broadcast_to(
      mask, patches.shape)), patch)) > 0.5
  masked = np.where(removed, np.uint8(GREY), original)
  reconstruction = to_uint8(patches * (1 - mask) + pred * mask)
  return {"original": original, "masked": masked, "reconstruction": reconstruction,
          "removed": removed[..., 0]}


def grid(panels: Dict[str, np.ndarray], gap: int = 2) -> np.ndarray:
  """Rows of [original | masked | reconstruction], `gap` white pixels between cells."""
  cols = [panels["original"], panels["masked"], panels["reconstruction"]]
  n, s = cols[0].shape[:2]
  out = np.full((n * s + (n - 1) * gap, 3 * s + 2 * gap, 3), 255, np.uint8)
  for r in range(n):
    for c, col in enumerate(cols):
      out[r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = col[r]
  return out


def png_bytes(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def from_checkpoint(config, checkpoint: str, data_dir: str, split: str = "test", num: int = 4,
                    out: Optional[str] = None) -> Dict[str, Any]:
  """Writes the grid of a pretraining checkpoint; returns {"file", "checkpoint", "images"}."""
  with errors.as_user_errors():
    step_dir = checkpointing.resolve_step_dir(checkpoint)
    tree = checkpointing.state_metadata(step_dir)
    if "decoder" not in tree.get("params", {}):
      raise errors.UserError(f"{step_dir} is not a UniEmoX pretraining checkpoint (no "
                             "params/decoder): there is no reconstruction to show")
    model = models.pretrain_model(config.model)
    images = fixed_images(data_dir, split, num, config.model.image_size)
    params = checkpointing.read_subtree(step_dir, ("params",))
  panels = reconstruct(model, params, images["image"], images["person"], seed=config.seed)
  out = out or storage.join(evaluate.default_out_dir(step_dir), f"reconstruction_{split}.png")
  if jax.process_index() == 0:
    storage.makedirs(storage.dirname(out))
    storage.write_bytes(out, png_bytes(grid(panels)))
  return {"file": out, "checkpoint": step_dir, "images": len(images["image"])}


def main(argv):
  del argv
  f = flags.FLAGS
  result = from_checkpoint(_CONFIG.value, f.checkpoint, f.data, f.split, f.num, f.out)
  print(f"{result['images']} images of {result['checkpoint']}; wrote: {result['file']}")


_CONFIG = None

if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The pretraining config (model).",
                                            lock_config=False)
  flags.DEFINE_string("checkpoint", None, "A pretraining checkpoint (<dir> or <dir>/<step>).")
  flags.DEFINE_string("data", None, "A converted dataset directory.")
  flags.DEFINE_string("split", "test", "The split whose first images are shown.")
  flags.DEFINE_integer("num", 4, "How many images (rows).")
  flags.DEFINE_string("out", None, "The PNG to write (default: beside the evaluations).")
  flags.mark_flags_as_required(["config", "checkpoint", "data"])
  from uniemox_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)

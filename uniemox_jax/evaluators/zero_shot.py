r"""Zero-shot emotion recognition with a pretrained UniEmoX: no training.

The fused student token gamma is distilled into CLIP's embedding space, so it can be compared
with CLIP text embeddings of the class names: each class's prompts (TEMPLATES) are embedded by
the teacher's text tower, normalized, averaged and normalized again; an image's scores are the
softmax of CLIP's logit scale times the cosine similarity of its gamma (from the eval-cropped
scene and its person view) with each class.

  python -m uniemox_jax.zero_shot --config configs/pretrain.py:vit=L/16 \
      --checkpoint /ckpt/uniemox-l16/checkpoints --data /data/emo8 --split test [--workdir OUT]

The report (as for fine-tuning) goes to OUT/zero_shot/ (OUT defaults to the checkpoint's
workdir).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import evaluate
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax import sharding
from uniemox_jax import storage
from uniemox_jax.models.uniemox import UniEmoX
from uniemox_jax.teacher import loading

TEMPLATES = (
    "The overall emotion conveyed is {}.",
    "A photo that conveys {}.",
    "An image evoking {}.",
    "A picture that makes people feel {}.",
)


def class_embeddings(teacher, class_names: Sequence[str],
                     templates: Sequence[str] = TEMPLATES) -> np.ndarray:
  """[C, D]: per class, the normalized mean of its normalized prompt embeddings."""
  prompts = [t.format(name.replace("_", " ")) for name in class_names for t in templates]
  emb = teacher.embed_texts(prompts).reshape(len(class_names), len(templates), -1)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  mean = emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot(config, checkpoint: str, data_dir: str, split: str = "test",
              out_dir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
  """The report of zero-shot classification of `split` with a pretraining checkpoint."""
  with errors.as_user_errors():
    step_dir = checkpointing.resolve_step_dir(checkpoint)
    workdir = storage.dirname(storage.dirname(step_dir))
    out_dir = out_dir or storage.join(evaluate.default_out_dir(step_dir), "zero_shot")
    info = input_pipeline.load_info(data_dir)
    if split not in info["splits"]:
      raise errors.UserError(f"--split {split!r}: {data_dir} has the splits "
                             f"{sorted(info['splits'])}")
    tree = checkpointing.state_metadata(step_dir)
    if "decoder" not in tree.get("params", {}):
      raise errors.UserError(
          f"{step_dir} is not a UniEmoX pretraining checkpoint (no params/decoder): "
          "zero-shot needs the student's projection into CLIP's space")
    model = models.pretrain_model(config.model)
    teacher = loading.load_teacher(config, workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    params = sharding.host_to_global(checkpointing.read_subtree(step_dir, ("params",)),
                                     sharding.replicated(mesh))
  text = jnp.asarray(class_embeddings(teacher, info["class_names"]))
  scale = teacher.logit_scale(teacher.params)
  multi = bool(info.get("multi_label"))

  @jax.jit
  def fn(p, batch):
    gamma = model.apply({"params": p}, augment.normalize(batch["image"]),
                        augment.normalize(batch["person"]), method=UniEmoX.embed)["gamma"]
    gamma = gamma.astype(jnp.float32)
    gamma = gamma / jnp.linalg.norm(gamma, axis=-1, keepdims=True)
    logits = scale * gamma @ text.T
    return {"scores": jax.nn.sigmoid(logits) if multi else jax.nn.softmax(logits)}
  dataset = input_pipeline.eval_dataset(
      data_dir, split, batch_size=evaluate.check_batch(config.get("eval_batch_size",
                                                                  config.batch_size), mesh),
      image_size=config.model.image_size, process_index=jax.process_index(),
      process_count=jax.process_count(), person_view=True)
  outputs = evaluate.gather_split(functools.partial(fn, params), dataset, mesh,
                                  keys=("image", "person"), progress=progress,
                                  description=f"zero-shot {split}")
  result = evaluate.report(outputs.pop("scores"), outputs, info)
  result.update(checkpoint=step_dir, split=split, templates=list(TEMPLATES))
  if jax.process_index() == 0:
    result["files"] = sorted(evaluate.write_report(result, out_dir, split).values())
  return result


def main(argv):
  del argv
  from uniemox_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(None, None, None)
  f = flags.FLAGS
  result = zero_shot(_CONFIG.value, f.checkpoint, f.data, f.split, f.out_dir)
  if jax.process_index() == 0:
    print(metrics.format_table(result, f"zero-shot, {f.split}: {result['checkpoint']}"))
    print("wrote: " + ", ".join(result["files"]), flush=True)


_CONFIG = None

if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The pretraining config (model "
                                            "and teacher).", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "A pretraining checkpoint (<dir> or <dir>/<step>).")
  flags.DEFINE_string("data", None, "A converted dataset directory.")
  flags.DEFINE_string("split", "test", "The split to classify.")
  flags.DEFINE_string("out_dir", None, "Where the report goes (default: "
                      "WORKDIR/evaluations/<checkpoint dir>-<step>/zero_shot).")
  flags.mark_flags_as_required(["config", "checkpoint", "data"])
  from uniemox_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)

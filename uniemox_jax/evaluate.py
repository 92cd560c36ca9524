r"""The evaluation command (any checkpoint, any evaluator of `config.evals`), and what every
evaluator shares: exact split gathering, the classification report and its files.

  python -m uniemox_jax.evaluate --config configs/finetune.py:dataset=emo8,data=/data/emo8 \
      --checkpoint WORKDIR/best [--evals classification] [--split test] [--out_dir OUT]
  python -m uniemox_jax.evaluate --config configs/demo.py --checkpoint workdirs/demo/checkpoints \
      [--evals zero_shot,linear_probe,reconstruction] [--data DIR]

Every example of the split is counted exactly once on any number of devices and processes:
the eval pipeline pads the last batch and marks padding with `mask` False and `index` -1; the
scores of every process are gathered, padding dropped, and the rest put back in record order
(`gather_split`). The report: top-1 / top-3 accuracy, per-class accuracy, macro F1 and the
confusion matrix (JSON and PNG with the class names), or mAP and per-class AP for
multi-label data, written to OUT/<evaluator>-<dataset>-<split>-<fingerprint>/ (with the
settings.json the fingerprint stands for) and printed as a table. OUT defaults to
WORKDIR/evaluations/<checkpoint dir>-<step>/ beside the evaluated checkpoint; a training
run's own reports are OUT/<evaluator>/, which the command never writes.
"""
from __future__ import annotations

import copy
import functools
import io
import json
from typing import Any, Callable, Dict, Optional, Sequence

from absl import flags
from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from data_pipelines import input_pipeline
from data_pipelines import storage
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import datasets
from uniemox_jax import distributed
from uniemox_jax import errors
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax import sharding


def check_batch(batch_size: int, mesh, field: str = "config.eval_batch_size") -> int:
  """This process's share of a global eval batch, after checking it divides evenly."""
  procs = jax.process_count()
  if batch_size % mesh.devices.size or batch_size % procs:
    raise ValueError(f"{field}={batch_size} must divide evenly over {mesh.devices.size} "
                     f"devices and {procs} processes")
  return batch_size // procs


def gather_split(fn: Callable[[Dict[str, jax.Array]], Dict[str, jax.Array]], dataset,
                 mesh, keys: Sequence[str] = ("image",), progress: bool = True,
                 description: str = "eval") -> Dict[str, np.ndarray]:
  """Runs `fn` (a jitted function of the device batch -> dict of [B, ...] outputs) over an
  `input_pipeline.eval_dataset` and returns, on every process, its outputs plus "label"
  (and "labels" for multi-label data) for every record of the split exactly once, in record
  order. Raises if any record is missing or repeated."""
  batch_sharding = sharding.batch_sharding(mesh)
  parts = []
  batches = iter(dataset)
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, total=len(dataset), desc=description, unit="batch")
  for i, host in enumerate(batches):
    device = {k: jax.make_array_from_process_local_data(batch_sharding, host[k]) for k in keys}
    if i == 0:
      fn = _compiled_together(fn, device, description)
    out = fn(device)
    local = {k: host[k] for k in ("index", "mask", "label", "labels") if k in host}
    parts.append((multihost_utils.process_allgather(out, tiled=True),
                  multihost_utils.process_allgather(local, tiled=True)))
  if not parts:
    raise ValueError("the evaluation split yielded no batch")
  joined = {k: np.concatenate([np.asarray(p[0][k]) for p in parts]) for k in parts[0][0]}
  joined.update({k: np.concatenate([np.asarray(p[1][k]) for p in parts]) for k in parts[0][1]})
  keep = joined.pop("mask").astype(bool)
  index = joined.pop("index")[keep]
  order = np.argsort(index, kind="stable")
  index = index[order]
  if not np.array_equal(index, np.arange(len(index))):
    raise RuntimeError("evaluation did not see every record exactly once: "
                       f"{len(index)} records, indices {index[:10]}...")
  return {k: v[keep][order] for k, v in joined.items()}


def _compiled_together(fn, device_batch, name: str):
  """`fn` (a jitted function of the batch, or a functools.partial of one) compiled, then every
  process waits for the others (`distributed.compile_together`)."""
  if jax.process_count() == 1:
    return fn
  target, args = fn, ()
  if isinstance(fn, functools.partial) and not fn.keywords:
    target, args = fn.func, fn.args
  if not hasattr(target, "lower"):
    return fn
  compiled = distributed.compile_together(target, *args, device_batch, name=name)
  return functools.partial(compiled, *args)


def report(scores: np.ndarray, outputs: Dict[str, np.ndarray], info: Dict[str, Any],
           top_k: int = 3) -> Dict[str, Any]:
  """The metrics of `uniemox_jax.metrics` for this dataset's kind (single- or multi-label)."""
  names = info["class_names"]
  if info.get("multi_label"):
    return metrics.multilabel_report(scores, outputs["labels"], names)
  return metrics.classification_report(scores, outputs["label"], names, top_k=top_k)


def write_report(result: Dict[str, Any], out_dir: str, name: str) -> Dict[str, str]:
  """OUT/<name>_results.json, and for single-label data <name>_confusion.json and .png."""
  storage.makedirs(out_dir)
  paths = {"results": storage.join(out_dir, f"{name}_results.json")}
  storage.write_text(paths["results"], json.dumps(result, indent=2))
  if "confusion_matrix" in result:
    paths["confusion_json"] = storage.join(out_dir, f"{name}_confusion.json")
    storage.write_text(paths["confusion_json"], json.dumps(
        {"class_names": result["class_names"],
         "rows_true_columns_predicted": result["confusion_matrix"]}, indent=2))
    paths["confusion_png"] = storage.join(out_dir, f"{name}_confusion.png")
    plot_confusion(np.asarray(result["confusion_matrix"]), result["class_names"],
                   paths["confusion_png"], title=name)
  return paths


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str,
                   title: str = "") -> None:
  """The confusion matrix, row-normalized colours, counts written in the cells."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(class_names)
  rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  size = max(4.0, 0.55 * n + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
  ax.set_yticks(range(n), labels=class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
              color="white" if matrix[i, j] > 0.5 * rows[i, 0] else "black")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())


# --- classifier checkpoints -------------------------------------------------------------


def check_classes(step_dir: str, info: Dict[str, Any]) -> None:
  """The checkpoint's head must predict this dataset's classes (by count, and by name when
  the checkpoint recorded them)."""
  names = info["class_names"]
  tree = checkpointing.state_metadata(step_dir)
  head = tree.get("params", {}).get("head")
  if head is None:
    raise errors.UserError(f"{step_dir} has no classification head (params/head): it is not a "
                     "fine-tuned checkpoint; use --config.init.encoder to fine-tune from it")
  width = head["kernel"].shape[-1]
  if width != len(names):
    raise errors.UserError(f"{step_dir}: the head predicts {width} classes but the dataset "
                     f"{info.get('name', '')} has {len(names)} ({names})")
  saved = checkpointing.read_meta(step_dir).get("class_names")
  if saved is not None and list(saved) != list(names):
    raise errors.UserError(f"{step_dir} was trained on classes {saved}, the dataset has {names}")


def with_checkpoint_pool(config, step_dir: str):
  """`config`, or a copy whose model pools as the checkpoint records (an imported timm ViT
  classifies its CLS token: `pool` "token"; see models/classifier.py)."""
  pool = checkpointing.read_meta(step_dir).get("pool")
  if pool is None or pool == config.model.get("pool", "avg"):
    return config
  logging.info("%s pools %r (recorded in the checkpoint); config.model.pool set to it",
               step_dir, pool)
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
  models.check_params(params, nn.unbox(abstract),
                      f"{what} (config.model: variant {model.variant}, "
                      f"pos_embed {model.pos_embed!r}, pool {model.pool!r})")
  shardings = sharding.param_shardings(abstract, mesh)
  return sharding.host_to_global(params, shardings)


def evaluate_classifier(config, params, split: str, mesh, info: Dict[str, Any],
                        data_dir: str, progress: bool = True,
                        scorer: Optional[Callable] = None,
                        params_source: Optional[str] = None) -> Dict[str, Any]:
  """The report of a classifier (host or global params) on `split` of `data_dir`.
  `scorer`: a `classifier_scorer` to reuse (a training run evaluating every epoch)."""
  model = models.classification_model(config.model, len(info["class_names"]))
  scorer = scorer or classifier_scorer(model, info.get("multi_label", False))
  local = check_batch(config.eval_batch_size, mesh)
  dataset = input_pipeline.eval_dataset(
      data_dir, split, batch_size=local, image_size=config.model.image_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
    params = place_classifier(model, params, mesh, config.model.image_size,
                              what=str(params_source or "the parameters"))
  outputs = gather_split(functools.partial(scorer, params), dataset, mesh, progress=progress, description=f"eval {split}")
  return report(outputs.pop("scores"), outputs, info)


def default_out_dir(step_dir: str) -> str:
  """WORKDIR/evaluations/<checkpoint dir>-<step> for WORKDIR/<checkpoint dir>/<step>."""
  root = storage.dirname(step_dir)
  return storage.join(storage.dirname(root), "evaluations",
                      f"{storage.basename(root)}-{storage.basename(step_dir)}")


def evaluate_checkpoint(config, checkpoint: str, split: str, out_dir: Optional[str] = None,
                        progress: bool = True) -> Dict[str, Any]:
  """Loads a fine-tuned checkpoint, evaluates it on `split`, writes and returns the report
  (its files under result["files"])."""
  with errors.as_user_errors():
    step_dir = checkpointing.resolve_step_dir(checkpoint)
    workdir = storage.dirname(storage.dirname(step_dir))   # the checkpoint's workdir
    out_dir = out_dir or default_out_dir(step_dir)
    data_dir = datasets.resolve_data_dir(config, workdir)
    info = input_pipeline.load_info(data_dir)
    if split not in info["splits"]:
      raise errors.UserError(f"--split {split!r}: {data_dir} has the splits "
                             f"{sorted(info['splits'])}")
    check_classes(step_dir, info)
    config = with_checkpoint_pool(config, step_dir)
    params = checkpointing.read_subtree(step_dir, ("params",))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  result = evaluate_classifier(config, params, split, mesh, info, data_dir, progress,
                               params_source=step_dir)
  result["checkpoint"] = step_dir
  result["split"] = split
  if jax.process_index() == 0:
    result["files"] = sorted(write_report(result, out_dir, split).values())
  return result


def evaluate_with(config, checkpoint: str, names: Optional[Sequence[str]] = None,
                  split: str = "", data: str = "", out_dir: Optional[str] = None,
                  progress: bool = True) -> Dict[str, Dict[str, Any]]:
  """Runs the evaluators of `config.evals` (only `names`, when given; `split` and `data`
  override their fields) on a checkpoint; each writes its report under
  OUT/<name>-<dataset>-<split>-<fingerprint>/ (`base.Evaluator.setting_folder`): another
  dataset, split or setting gets another folder, and none is the training run's
  OUT/<name>/. Returns {name: report with "scalars" and "files"}."""
  from uniemox_jax import evaluators  # pylint: disable=g-import-not-at-top
  checks = errors.Checks()          # both problems at once, before any work
  if out_dir and jax.process_index() == 0:
    with checks.check():
      storage.check_writable(out_dir)
  with checks.check():
    step_dir = checkpointing.resolve_step_dir(checkpoint)
  checks.raise_any()
  with errors.as_user_errors():
    workdir = storage.dirname(storage.dirname(step_dir))   # the checkpoint's workdir
    if not out_dir:
      out_dir = default_out_dir(step_dir)
      if jax.process_index() == 0:
        storage.check_writable(out_dir)
    tree = checkpointing.state_metadata(step_dir)
    if "head" in tree.get("params", {}):
      config = with_checkpoint_pool(config, step_dir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    chosen = evaluators.build(config, workdir, mesh, names, progress=progress,
                              overrides={"split": split, "data": data})
    for evaluator in chosen.values():
      evaluator.check_checkpoint(step_dir, tree)
    params = checkpointing.read_subtree(step_dir, ("params",))
  results = {}
  for name, evaluator in chosen.items():
    result = evaluator.run(params)
    files = evaluator.write(result, out_dir, folder=evaluator.setting_folder())
    results[name] = dict(result.report, checkpoint=step_dir, split=evaluator.split,
                         scalars=result.scalars, files=files)
  return results


_CONFIG = None


def main(argv):
  del argv
  from uniemox_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(None, None, None)
  f = flags.FLAGS
  names = [n for n in (f.evals or "").split(",") if n]
  results = evaluate_with(_CONFIG.value, f.checkpoint, names, f.split or "", f.data or "",
                          f.out_dir)
  if jax.process_index() == 0:
    for name, result in results.items():
      title = f"{name}, {result['split']}: {result['checkpoint']}"
      if "num_examples" in result:
        print(metrics.format_table(result, title))
      else:
        print(title + ": " + ", ".join(f"{k} {v:.4g}" for k, v in result["scalars"].items()))
      print("wrote: " + ", ".join(result["files"]), flush=True)


if __name__ == "__main__":
  from uniemox_jax import cli  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The config the checkpoint was "
                                            "trained with (model, data, teacher, evals).",
                                            lock_config=False)
  flags.DEFINE_string("checkpoint", None, "A checkpoint directory (<dir> or <dir>/<step>).")
  flags.DEFINE_string("evals", None, "Comma-separated names of config.evals to run (default: "
                      "all of them).")
  flags.DEFINE_string("split", None, "The split every chosen evaluator reports on (default: "
                      "each one's config.evals.<name>.split).")
  flags.DEFINE_string("data", None, "A converted dataset directory for every chosen "
                      "evaluator (default: each one's data, else the config's).")
  flags.DEFINE_string("out_dir", None, "Where the reports go, one folder per evaluator "
                      "(default: WORKDIR/evaluations/<checkpoint dir>-<step>, beside the "
                      "checkpoint).")
  flags.mark_flags_as_required(["config", "checkpoint"])
  cli.run(main)

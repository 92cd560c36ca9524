"""The interface every evaluator has, and what they share.

An evaluator is built once from the run's config and its entry `config.evals.<name>` (which
names its `type`, its `period` and its own fields), checks before anything runs that its data
and splits exist, and then scores parameters any number of times: `run(params)` -> `Result`
(scalars to log, a JSON report, images), `write(result, out_dir)` -> the files it wrote.
The same object runs every `period` steps inside a training run (`uniemox_jax.trainer`) and
once from the evaluation command (`python -m uniemox_jax.evaluate`) on a checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from data_pipelines import dataset_info
from data_pipelines import storage
from uniemox_jax import checkpointing
from uniemox_jax import datasets
from uniemox_jax import errors
from uniemox_jax import sharding
from uniemox_jax import summaries
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import reports

# What parameters an evaluator reads: a pretraining model's (encoder, decoder, fuse), a
# classifier's (encoder, fc_norm, head), or either (only params["encoder"]).
PRETRAIN, CLASSIFIER, ENCODER = "pretrain", "classifier", "encoder"


@dataclasses.dataclass
class Result:
  scalars: Dict[str, float]                      # logged as "<name>/<key>"
  report: Dict[str, Any]                         # JSON-able, written as <split>_results.json
  images: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # uint8 [H, W, 3]


class Evaluator:
  """Subclasses set `reads` (PRETRAIN, CLASSIFIER or ENCODER) and `defaults` (their fields of
  config.evals.<name> beyond type, period, data and split), and implement `run`."""
  reads = ENCODER
  defaults: Dict[str, Any] = {}

  def __init__(self, name: str, spec, config, workdir: str, mesh, teacher=None,
               progress: bool = False, origins: Optional[Dict[str, str]] = None):
    self.name, self.config, self.workdir, self.mesh = name, config, workdir, mesh
    self.field = f"config.evals.{name}"
    # Where each field's value came from, for the messages: the command's flag that set it
    # (--data, --split), else the config field.
    self.origin = {key: f"{self.field}.{key}" for key in ("data", "split")}
    self.origin.update(origins or {})
    known = {"type", "period", "data", "split"} | set(self.defaults)
    unknown = sorted(set(spec) - known)
    if unknown:
      raise errors.UserError(f"{self.field}: unknown fields {unknown} for type "
                             f"{spec['type']!r} (it has {sorted(known)})")
    self.spec = {"data": "", "split": "test", "period": 0, **self.defaults, **dict(spec)}
    self.period = int(self.spec["period"])
    self.split = self.spec["split"]
    self._teacher = teacher
    self.progress = progress
    self.data_dir = self.spec["data"] or datasets.resolve_data_dir(config, workdir)
    self.info = dataset_info.DatasetInfo.load(
        self.data_dir, self.origin["data"] if self.spec["data"] else "config.data.dir")
    self.batch_size      # checks the eval batch divides over the devices and processes
    self.info.check_splits(self.data_dir, {
        s: self.origin["split"] if s == self.split else self.field for s in self.splits()})

  def splits(self) -> List[str]:
    """Every split the evaluator reads (checked when it is built)."""
    return [self.split]

  def due(self, step: int, total: int) -> bool:
    """Whether a training run evaluates after `step` of `total`: every `period` steps and at
    the last step; never with a period of 0 (then only the evaluation command runs it)."""
    return self.period > 0 and (step % self.period == 0 or step == total)

  @property
  def teacher(self):
    if self._teacher is None:
      from uniemox_jax.teacher import loading  # pylint: disable=g-import-not-at-top
      self._teacher = loading.load_teacher(self.config, self.workdir)
    return self._teacher

  @property
  def batch_size(self) -> int:
    """This process's share of the eval batch (config.eval_batch_size, else batch_size)."""
    return gathering.check_batch(self.config.eval_batch_size, self.mesh)

  def check_checkpoint(self, ckpt: checkpointing.Checkpoint) -> None:
    """Fails, naming the checkpoint, when its parameters cannot be scored here."""
    params, step_dir = ckpt.params, ckpt.step_dir
    if self.reads == PRETRAIN and "decoder" not in params:
      raise errors.UserError(f"{step_dir} is not a UniEmoX pretraining checkpoint (no "
                             f"params/decoder): {self.field} ({self.spec['type']}) needs one")
    if self.reads == CLASSIFIER and "head" not in params:
      raise errors.UserError(f"{step_dir} has no classification head (params/head): "
                             f"{self.field} ({self.spec['type']}) needs a fine-tuned checkpoint")
    if "encoder" not in params:
      raise errors.UserError(f"{step_dir} has no params/encoder: nothing to evaluate")

  def place(self, params):
    return place(params, self.mesh)

  def run(self, params) -> Result:
    raise NotImplementedError

  def compile_ahead(self, params) -> None:
    """Compiles what `run(params)` will run over the batches (its `gathering.EvalStep`)
    before a training run's first step; evaluators without one compile when they run."""

  def settings(self) -> Dict[str, Any]:
    """Everything the result depends on besides the parameters: this evaluator's resolved
    fields (its data as an absolute path) and the config's model and teacher."""
    spec = dict(self.spec, data=storage.absolute(self.data_dir), split=self.split)
    spec.pop("period", None)
    return {"evaluator": self.name, **spec, "model": self.config.model.to_dict(),
            "teacher": self.config.teacher.to_dict() if "teacher" in self.config else None}

  def setting_folder(self) -> str:
    """<name>-<dataset>-<split>-<fingerprint of settings()>: the evaluation command's folder
    for this evaluation, so that evaluations of different data, splits or settings never share
    a path (and never a training run's <name>/)."""
    text = json.dumps(self.settings(), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    dataset = re.sub(r"[^A-Za-z0-9_.]+", "_", self.info.name or "data")
    return f"{self.name}-{dataset}-{self.split}-{digest}"

  def write(self, result: Result, out_dir: str, folder: Optional[str] = None,
            at: str = "") -> List[str]:
    """OUT/<folder>/ (default: OUT/<name>/, a training run's): the report (as
    `reports.write_report` writes it) and each image as PNG, the figures titled with the
    dataset, the split and `at` (the checkpoint and step); with a `folder`, also
    settings.json (what `setting_folder`'s fingerprint stands for). Process 0 writes; returns
    the paths."""
    if jax.process_index() != 0:
      return []
    folder = storage.join(out_dir, folder or self.name)
    lines = [f"{self.info.name or 'data'} {self.split}", at]
    files = list(reports.write_report(result.report, folder, self.split,
                                      " | ".join(filter(None, lines))).values()) \
        if result.report else []
    for key, image in result.images.items():
      path = storage.join(folder, f"{key}_{self.split}.png")
      storage.makedirs(folder)
      storage.write_bytes(path, summaries.png(reports.captioned(image, lines)))
      files.append(path)
    if folder != storage.join(out_dir, self.name):
      path = storage.join(folder, "settings.json")
      storage.makedirs(folder)
      storage.write_text(path, json.dumps(self.settings(), indent=2, sort_keys=True,
                                          default=str))
      files.append(path)
    return sorted(files)


def place(params, mesh):
  """Parameters as global arrays: host trees (a checkpoint read by the command) are
  replicated over `mesh`; a training run's arrays are used where they are."""
  if all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
    return params
  return sharding.host_to_global(params, sharding.replicated(mesh))


def float_scalars(report: Dict[str, Any]) -> Dict[str, float]:
  """The report's float entries (top-1, macro F1, mAP...): what a run logs."""
  return {k: float(v) for k, v in report.items() if isinstance(v, float)}

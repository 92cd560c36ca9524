"""Evaluators: everything that scores a model's parameters, behind one interface
(`base.Evaluator`), chosen by `config.evals.<name>.type`:

  classification   a fine-tuned classifier on a split (the report fine-tuning writes)
  linear_probe     a linear classifier on the frozen encoder's features
  zero_shot        a pretrained UniEmoX's gamma against CLIP text embeddings of the classes
  reconstruction   a grid of fixed images: original | masked | reconstruction
  explain          a grid of fixed images and a fine-tuned classifier's heatmaps over them

Every entry of `config.evals` runs every `period` steps of a training run (any task), and
`evaluate_checkpoint` (the evaluation command, `python -m uniemox_jax.evaluate`) runs any of
them on any checkpoint. What they share: exactly-once gathering of a split (`gathering`), the
classification report and its files (`reports`), classifier checkpoints (`classification`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import jax

from data_pipelines import storage
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import sharding
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators import classification
from uniemox_jax.evaluators import reports
from uniemox_jax.models import surgery
from uniemox_jax.evaluators.base import Evaluator, Result  # noqa: F401  (the interface)
from uniemox_jax.evaluators.heatmaps import Explain
from uniemox_jax.evaluators.linear_probe import LinearProbe
from uniemox_jax.evaluators.reconstruction import Reconstruction
from uniemox_jax.evaluators.zero_shot import ZeroShot

REGISTRY = {"classification": classification.Classification, "linear_probe": LinearProbe,
            "zero_shot": ZeroShot, "reconstruction": Reconstruction, "explain": Explain}


def register(type_name: str, cls) -> None:
  """Adds an evaluator type (a `base.Evaluator` subclass) for `config.evals.<name>.type`."""
  REGISTRY[type_name] = cls


def build(config, workdir: str, mesh, names: Optional[Sequence[str]] = None, *,
          reads: Optional[str] = None, teacher=None, progress: bool = False,
          overrides: Optional[Dict[str, str]] = None,
          training: bool = False) -> Dict[str, base.Evaluator]:
  """The evaluators of `config.evals` (only `names`, when given; with `training`, those with a
  period), built and checked. `reads`:
  the run's parameters (base.PRETRAIN or base.CLASSIFIER), refusing evaluators that cannot
  score them; `overrides`: fields set on every chosen entry by the command's flags (--split,
  --data), which its messages then name."""
  evals = dict(config.evals)
  if training:     # only those a training run will run: a period of 0 is the command's
    chosen = [n for n, spec in evals.items() if int(spec.get("period", 0)) > 0]
  else:
    chosen = list(names) if names else list(evals)
  missing = [n for n in chosen if n not in evals]
  if missing:
    raise errors.UserError(f"--evals {','.join(missing)}: not in config.evals (it has "
                           f"{', '.join(sorted(evals)) or 'none'})")
  out = {}
  for name in chosen:
    spec = dict(evals[name])
    spec.update({k: v for k, v in (overrides or {}).items() if v})
    kind = spec.get("type")
    if kind not in REGISTRY:
      raise errors.UserError(f"config.evals.{name}.type={kind!r}: choose one of "
                             f"{sorted(REGISTRY)}")
    cls = REGISTRY[kind]
    if reads and cls.reads not in (reads, base.ENCODER):
      raise errors.UserError(f"config.evals.{name}: type {kind} scores a {cls.reads} model; "
                             f"this run trains a {reads} model")
    origins = {k: f"--{k}" for k, v in (overrides or {}).items() if v}
    with errors.as_user_errors():
      out[name] = cls(name, spec, config, workdir, mesh, teacher=teacher, progress=progress,
                      origins=origins)
  return out


def evaluate_checkpoint(config, checkpoint: str, names: Optional[Sequence[str]] = None,
                        split: str = "", data: str = "", out_dir: Optional[str] = None,
                        progress: bool = True) -> Dict[str, Dict[str, Any]]:
  """Runs the evaluators of `config.evals` (only `names`, when given; `split` and `data`, the
  command's --split and --data, override their fields) on a checkpoint ("<dir>" or
  "<dir>/<step>"); each writes its report under OUT/<name>-<dataset>-<split>-<fingerprint>/
  (`base.Evaluator.setting_folder`): another dataset, split or setting gets another folder,
  and none is a training run's OUT/<name>/. OUT: `out_dir`, else the checkpoint's
  evaluations folder (`reports.out_dir`). Returns {name: report with "scalars" and "files"}."""
  checks = errors.Checks()          # both problems at once, before any work
  if out_dir and jax.process_index() == 0:
    with checks.check():
      storage.check_writable(out_dir)
  with checks.check():
    ckpt = checkpointing.Checkpoint.open(checkpoint)
  checks.raise_any()
  with errors.as_user_errors():
    if not out_dir:
      out_dir = reports.out_dir(ckpt.step_dir)
      if jax.process_index() == 0:
        storage.check_writable(out_dir)
    if "head" in ckpt.params:
      config = classification.with_checkpoint_pool(config, ckpt)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    chosen = build(config, ckpt.workdir, mesh, names, progress=progress,
                   overrides={"split": split, "data": data})
    for evaluator in chosen.values():
      evaluator.check_checkpoint(ckpt)
    # Saved unrolled or scanned: read into the layout of the model the config builds.
    params = surgery.to_layout(ckpt.read(("params",)), scanned=config.model.scan)
  results = {}
  for name, evaluator in chosen.items():
    result = evaluator.run(params)
    files = evaluator.write(result, out_dir, folder=evaluator.setting_folder(), at=ckpt.label)
    results[name] = dict(result.report, checkpoint=ckpt.step_dir, split=evaluator.split,
                         scalars=result.scalars, files=files)
  return results

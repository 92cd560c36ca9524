"""Evaluators: everything that scores a model's parameters, behind one interface
(`base.Evaluator`), chosen by `config.evals.<name>.type`:

  classification   a fine-tuned classifier on a split (the report fine-tuning writes)
  linear_probe     a linear classifier on the frozen encoder's features
  zero_shot        a pretrained UniEmoX's gamma against CLIP text embeddings of the classes
  reconstruction   a grid of fixed images: original | masked | reconstruction

Every entry of `config.evals` runs every `period` steps of a training run (any task) and from
the evaluation command (`python -m uniemox_jax.evaluate`) on any checkpoint.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from uniemox_jax import errors
from uniemox_jax.evaluators import base
from uniemox_jax.evaluators.base import Evaluator, Result  # noqa: F401  (the interface)
from uniemox_jax.evaluators.classification import Classification
from uniemox_jax.evaluators.linear_probe import LinearProbe
from uniemox_jax.evaluators.reconstruction import Reconstruction
from uniemox_jax.evaluators.zero_shot import ZeroShot

REGISTRY = {"classification": Classification, "linear_probe": LinearProbe,
            "zero_shot": ZeroShot, "reconstruction": Reconstruction}


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
  evals = dict(config.get("evals") or {})
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

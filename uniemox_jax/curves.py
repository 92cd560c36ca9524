"""A run's curves from its metrics.jsonl: the library of `python -m uniemox_jax.plots`.

One panel each: the losses, the learning rate, images/s, the gradient, parameter and update
norms, and every evaluator (its scalars, "<name>/<metric>", at the steps it ran). A resumed
run's repeated steps keep their last value; a killed run's cut-off last line is skipped.
"""
from __future__ import annotations

import json
from typing import Dict, List

from data_pipelines import storage
from uniemox_jax import errors
from uniemox_jax.evaluators import reports

METRICS = "metrics.jsonl"
# Panel title -> the training metrics it draws (those the run logged).
TRAINING_PANELS = {"losses": ("total", "loss", "l1", "l2", "l3"),
                   "learning rate": ("learning_rate",), "images/s": ("images_per_sec",),
                   "norms": ("grad_norm", "param_norm", "update_norm")}


def read_metrics(path: str) -> Dict[int, Dict[str, float]]:
  """{step: {metric: value}} of a metrics.jsonl; a later line for a step replaces an earlier
  one's values (a resumed run logs them again). A last line cut short (a killed run) is
  skipped; any other unreadable line is an error naming it."""
  if not storage.exists(path):
    raise errors.UserError(f"{path} does not exist: is {storage.dirname(path)} a training "
                           "run's folder?")
  lines = storage.read_text(path).splitlines()
  rows: Dict[int, Dict[str, float]] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row.pop("step"))
    except (ValueError, KeyError, TypeError):
      if number == len(lines):
        continue
      raise errors.UserError(f"{path}, line {number}: not a JSON object with a step") from None
    rows.setdefault(step, {}).update(
        {k: float(v) for k, v in row.items() if isinstance(v, (int, float))})
  if not rows:
    raise errors.UserError(f"{path} holds no metrics yet")
  return dict(sorted(rows.items()))


def panels(rows: Dict[int, Dict[str, float]]) -> Dict[str, List[str]]:
  """Panel title -> the metrics drawn in it, those the run has."""
  logged = sorted({k for values in rows.values() for k in values})
  out = {title: [k for k in keys if k in logged] for title, keys in TRAINING_PANELS.items()}
  for key in logged:
    if "/" in key:
      out.setdefault(key.split("/")[0], []).append(key)
  return {title: keys for title, keys in out.items() if keys}


def plot(rows: Dict[int, Dict[str, float]], path: str, title: str) -> None:
  plt = reports.pyplot()
  chosen = panels(rows)
  ncols = 2
  nrows = -(-len(chosen) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(12, 3.2 * nrows + 0.6), squeeze=False)
  for ax, (name, keys) in zip(axes.flat, chosen.items()):
    for key in keys:
      steps = [s for s, values in rows.items() if key in values]
      ax.plot(steps, [rows[s][key] for s in steps], marker="." if len(steps) < 30 else None,
              label=key.split("/")[-1] if "/" in key else key)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if name == "norms" or (name == "losses" and _spans_decades(rows, keys)):
      ax.set_yscale("log")
    if len(keys) > 1:
      ax.legend(fontsize=8)
    else:
      ax.set_ylabel(keys[0].split("/")[-1])
  for ax in list(axes.flat)[len(chosen):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  reports.save_figure(fig, path)


def _spans_decades(rows, keys) -> bool:
  values = [v[k] for v in rows.values() for k in keys if k in v and v[k] > 0]
  return bool(values) and max(values) / min(values) > 100

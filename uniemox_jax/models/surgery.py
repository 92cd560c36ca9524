"""One way to put a tree of arrays into the layout of a model's parameters, with a report:
every array of the source is loaded, dropped on purpose (`drop`) or unexpected; every array of
the model is loaded, kept from its initialization on purpose (`keep`) or missing; shapes are
checked and dtypes cast; unrolled blocks are stacked for a scanned model. The parameter checks
(`models.check_params`), a classifier's pretrained encoder (`classifier.load_encoder_params`)
and the PyTorch import (`torch_import.fit_to`) all go through `fit`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Sequence, Tuple

import jax
import numpy as np
from flax import traverse_util

from uniemox_jax import errors


@dataclasses.dataclass
class Fit:
  loaded: List[str] = dataclasses.field(default_factory=list)
  dropped: List[str] = dataclasses.field(default_factory=list)   # source only, on purpose
  kept: List[str] = dataclasses.field(default_factory=list)      # model only, on purpose
  missing: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  misshaped: List[str] = dataclasses.field(default_factory=list)

  @property
  def problems(self) -> List[str]:
    return ([f"missing {k}" for k in self.missing] + [f"unexpected {k}" for k in self.unexpected]
            + self.misshaped)

  def check(self, what: str) -> None:
    """Raises a user error naming every problem: `what` does not fit the model."""
    if self.problems:
      raise errors.UserError(f"{what} does not fit the model:\n  " + "\n  ".join(self.problems))

  def summary(self) -> str:
    return (f"loaded {len(self.loaded)} arrays; dropped as expected: {self.dropped or 'none'}; "
            f"kept from initialization: {self.kept or 'none'}")


def fit(source: Any, template: Any, *, drop: Sequence[str] = (), keep: Sequence[str] = (),
        prefix: str = "", source_name: str = "saved") -> Tuple[Dict[str, Any], Fit]:
  """(`source` in the layout of `template`, the report). Keys are "/"-joined paths, reported
  with `prefix`; a kept array takes `template`'s value (its initialization)."""
  target = traverse_util.flatten_dict(dict(template), sep="/")
  if any("/blocks/" in k for k in target):
    source = stack_blocks(source)
  given = traverse_util.flatten_dict(dict(source), sep="/")
  report, out = Fit(), {}
  for key, value in given.items():
    if key not in target:
      (report.dropped if key in drop else report.unexpected).append(prefix + key)
    elif tuple(np.shape(value)) != tuple(target[key].shape):
      report.misshaped.append(f"{prefix}{key}: {source_name} shape {tuple(np.shape(value))} != "
                              f"model shape {tuple(target[key].shape)}")
    else:
      out[key] = np.asarray(value).astype(target[key].dtype)
      report.loaded.append(prefix + key)
  for key in target:
    if key not in given:
      if key in keep:
        out[key] = target[key]
        report.kept.append(prefix + key)
      else:
        report.missing.append(prefix + key)
  return traverse_util.unflatten_dict(out, sep="/"), report


def stack_blocks(tree: Any) -> Any:
  """Unrolled {"block_0": .., "block_1": ..} -> scanned {"blocks": stacked}, recursively."""
  if not isinstance(tree, dict):
    return tree
  if tree and all(re.fullmatch(r"block_\d+", k) for k in tree):
    blocks = [tree[f"block_{i}"] for i in range(len(tree))]
    return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  return {k: stack_blocks(v) for k, v in tree.items()}

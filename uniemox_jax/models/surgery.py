"""One way to put a tree of arrays into the layout of a model's parameters, with a report:
every array of the source is loaded, dropped on purpose (`drop`) or unexpected; every array of
the model is loaded, kept from its initialization on purpose (`keep`) or missing; shapes are
checked and dtypes cast; blocks are stacked for a scanned model, unstacked for an unrolled one. The parameter checks
(`models.check_params`), a classifier's pretrained encoder (`classifier.load_encoder_params`)
the PyTorch import (`torch_import.fit_to`) and a transformers backbone's weights
(`hf_backbone`) all go through `fit`.
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
  source = to_layout(source, scanned=layout(template) == "scanned")
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


_BLOCK = re.compile(r"block_\d+")


def _map_dicts(tree: Any, fn) -> Any:
  """`fn` applied bottom-up to every dict of a tree of dicts, lists, tuples and namedtuples
  (a parameter tree, or a whole train state with its optimizer state)."""
  if isinstance(tree, dict):
    return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_dicts(x, fn) for x in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_dicts(x, fn) for x in tree)
  return tree


def stack_blocks(tree: Any, stack=np.stack) -> Any:
  """Unrolled {"block_0": .., "block_1": ..} -> scanned {"blocks": stacked}, wherever such a
  dict sits in `tree`. `stack` joins one leaf's per-layer values (NumPy's by default)."""
  def fn(d):
    if d and all(_BLOCK.fullmatch(k) for k in d):
      blocks = [d[f"block_{i}"] for i in range(len(d))]
      return {"blocks": jax.tree.map(lambda *xs: stack(xs), *blocks)}
    return d
  return _map_dicts(tree, fn)


def unstack_blocks(tree: Any, index=lambda x, i: x[i]) -> Any:
  """Scanned {"blocks": stacked} -> unrolled {"block_0": .., ...}, wherever it sits.
  `index(leaf, i)` takes layer i of a stacked leaf."""
  def fn(d):
    if set(d) == {"blocks"}:
      depth = jax.tree.leaves(d["blocks"])[0].shape[0]
      return {f"block_{i}": jax.tree.map(lambda x, i=i: index(x, i), d["blocks"])
              for i in range(depth)}
    return d
  return _map_dicts(tree, fn)


def layout(tree: Any) -> str:
  """"scanned" if a stacked "blocks" dict sits in `tree`, "unrolled" if "block_<i>" dicts
  do, "" if neither (a tree without transformer stacks)."""
  found = set()

  def fn(d):
    found.update("scanned" if k == "blocks" else "unrolled" for k in d
                 if k == "blocks" or _BLOCK.fullmatch(k))
    return d
  _map_dicts(tree, fn)
  return found.pop() if len(found) == 1 else ""


def to_layout(tree: Any, scanned: bool) -> Any:
  """`tree` (host arrays) in the scanned or the unrolled layout, whichever it was in."""
  return stack_blocks(tree) if scanned else unstack_blocks(tree)

"""A folder of images with a table of labels, the usual shape of "my own data":

  labels.csv / .tsv   a header row, then one row per image
  labels.jsonl        one JSON object per line
  labels.json         a list of objects, or one object {image path: label}

The image column holds paths (relative to --root, which defaults to the table's folder, or
absolute); the label column class names (sorted alphabetically into indexes, as class folders
are) or integers 0..K-1 (named by their numbers). With a split column (train / val / test,
`validation` and `dev` read as val) the table's split is kept; without one, each class is split
by a seeded recipe or --split_fractions as raw class folders are, and the split is written as a
manifest a later run can reuse. A row without a label is left out and counted; an image listed
twice with two labels is refused, naming both rows.
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from data_pipelines import sources
from data_pipelines import storage

_INTEGER = re.compile(r"^-?\d+$")


def _read_rows(path: str) -> List[Dict[str, Any]]:
  """The table's rows as dicts, by the file's extension."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--labels {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in (".csv", ".tsv"):
      with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        rows = list(reader)
      if reader.fieldnames is None:
        raise ValueError(f"--labels {path} is empty: expected a header row")
      return rows
    if ext == ".jsonl":
      with open(path, encoding="utf-8") as f:
        rows = []
        for n, line in enumerate(f, 1):
          if line.strip():
            try:
              rows.append(json.loads(line))
            except json.JSONDecodeError as e:
              raise ValueError(f"--labels {path} line {n} is not valid JSON: {e}") from None
        return rows
    if ext == ".json":
      data = storage.read_json(path, "--labels")
      if isinstance(data, dict):
        return [{"image": k, "label": v} for k, v in data.items()]
      if isinstance(data, list):
        return data
      raise ValueError(f"--labels {path} should hold a list of objects or an object "
                       "{image path: label}")
  except UnicodeDecodeError as e:
    raise ValueError(f"--labels {path} is not UTF-8 text: {e}") from None
  raise ValueError(f"--labels {path}: a .csv, .tsv, .json or .jsonl file is expected")


def _columns(path: str, rows: List[Any], wanted: Sequence[Tuple[str, str]]) -> None:
  for n, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"--labels {path} row {n + 1}: expected an object with the columns "
                       f"{[c for c, _ in wanted]}, got {row!r}")
  present = list(rows[0]) if rows else []
  for column, flag in wanted:
    if column and column not in present:
      hint = " (a JSON object {path: label} has the columns image and label)" \
          if path.endswith(".json") else ""
      raise ValueError(f"--labels {path} has no column {column!r} ({flag}); its columns are "
                       f"{present}{hint}")


def _class_names(values: List[str]) -> Tuple[List[str], str]:
  if values and all(_INTEGER.match(v) for v in values):
    top = max(int(v) for v in values)
    if min(int(v) for v in values) < 0:
      raise ValueError("integer labels must be 0 or more (a class index); got "
                       f"{min(int(v) for v in values)}")
    return [str(i) for i in range(top + 1)], "integer labels, named by their numbers"
  return sorted(set(values)), "class names sorted alphabetically"


def plan(labels: str, name: str, root: str = "", image_column: str = "image",
         label_column: str = "label", split_column: str = "",
         splits: Sequence[str] = sources.SPLITS, recipe: str = "",
         fractions: Sequence[float] = (), seed: int = 0,
         manifest: Optional[Mapping[str, List[str]]] = None) -> sources.Plan:
  """The records of the table `labels` (images under `root`, default the table's folder)."""
  root = root or os.path.dirname(os.path.abspath(labels))
  sources.require_dir(root, "--root")
  rows = _read_rows(labels)
  if not rows:
    raise ValueError(f"--labels {labels} has no rows")
  _columns(labels, rows, [(image_column, "--image_column"), (label_column, "--label_column"),
                          (split_column, "--split_column")])
  result = sources.Plan(name, [], [])
  seen: Dict[str, Tuple[int, str]] = {}
  kept: List[Tuple[int, str, str, str]] = []        # (row, relative path, label, split)
  unlabelled = 0
  for n, row in enumerate(rows, 1):
    where = f"--labels {labels} row {n}"
    image, label = row.get(image_column), row.get(label_column)
    if not isinstance(image, str) or not image.strip():
      raise ValueError(f"{where}: column {image_column!r} holds no image path ({image!r})")
    if label is None or (isinstance(label, str) and not label.strip()):
      unlabelled += 1
      continue
    if isinstance(label, bool) or not isinstance(label, (str, int)):
      raise ValueError(f"{where}: label {label!r} is neither a class name nor a class index")
    label = str(label).strip()
    path = image.strip()
    rel = os.path.relpath(path, root) if os.path.isabs(path) else os.path.normpath(path)
    split = sources.our_split(str(row.get(split_column) or "")) if split_column else ""
    if split_column and not split:
      raise ValueError(f"{where}: column {split_column!r} (--split_column) is empty")
    if rel in seen:
      first, first_label = seen[rel]
      if first_label != label:
        raise ValueError(f"--labels {labels}: {path!r} is listed twice with two labels, "
                         f"{first_label!r} (row {first}) and {label!r} (row {n})")
      result.problems.append(f"--labels {labels}: {path!r} is listed again in row {n} "
                             f"(first in row {first}); converted once")
      continue
    seen[rel] = (n, label)
    kept.append((n, rel, label, split))
  result.class_names, named = _class_names([label for _, _, label, _ in kept])
  if unlabelled:
    result.problems.append(f"{unlabelled} row(s) of --labels {labels} have no label; left out")

  if split_column:
    assigned = {rel: split for _, rel, _, split in kept}
    how = f"splits from column {split_column!r}"
  else:
    assigned = _draw(kept, result.class_names, recipe, fractions, seed, manifest, result)
    how = ("the split of --manifest" if manifest is not None else
           f"split drawn per class (seed {seed})")
    result.manifest = {s: sorted(r for r, sp in assigned.items() if sp == s) for s in
                       sorted(set(assigned.values()))}
  for _, rel, label, _ in kept:
    split = assigned.get(rel)
    if split is None or (split in sources.SPLITS and split not in splits):
      continue
    result.entries.append(sources.Entry(split, os.path.join(root, rel), rel,
                                        result.class_names.index(label), label))
  counts = {c: 0 for c in result.class_names}
  for e in result.entries:
    counts[e.label_name] += 1
  result.empty_classes = [c for c, k in counts.items() if not k]
  result.problems += [f"class {c!r} has no image" for c in result.empty_classes]
  for split in splits:
    if not any(e.split == split for e in result.entries):
      result.problems.append(f"no image of split {split!r} in --labels {labels}")
  result.layout = f"a table of labels ({os.path.basename(labels)}): {how}; {named}"
  return result


def _draw(kept, class_names, recipe, fractions, seed, manifest, result) -> Dict[str, str]:
  """{relative path: split}: the saved manifest's, or a seeded stratified draw per class."""
  if manifest is not None:
    assigned = {rel: split for split, rels in manifest.items() for rel in rels}
    listed = {rel for _, rel, _, _ in kept}
    result.problems += [f"manifest lists {rel!r}, which is not in --labels"
                        for rel in sorted(set(assigned) - listed)]
    result.problems += [f"{rel!r} is in --labels but in no split of the manifest"
                        for rel in sorted(listed - set(assigned))]
    return assigned
  fractions = sources.split_fractions(
      recipe, fractions, "a table without --split_column is split per class: give --recipe "
      f"(one of {sorted(sources.RECIPES)}) or --split_fractions train,val,test, or --manifest")
  rng = np.random.default_rng(seed)
  assigned = {}
  for cls in class_names:
    files = sorted(rel for _, rel, label, _ in kept if label == cls)
    for split, rels in sources.draw_split(files, fractions, rng, sources.SPLITS).items():
      assigned.update({rel: split for rel in rels})
  return assigned

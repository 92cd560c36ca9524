"""Hugging Face datasets as they sit on disk, read with pyarrow (the `datasets` library is not
needed at run time):

  hub parquet     <root>/data/<split>-NNNNN-of-NNNNN.parquet (what the hub serves and
                  `push_to_hub` writes), the splits from README.md's `configs` when it has
                  them, else from the file names (`<split>-*`, `<split>.parquet`, `<split>/`)
  save_to_disk    <root>/dataset_dict.json with <root>/<split>/{state.json, *.arrow}, or one
                  split's <root>/{state.json, dataset_info.json, *.arrow}

The image column holds `datasets.Image` values ({bytes, path}: the bytes, or a path to the file
when the bytes were not embedded), plain bytes, or a path string. The label column is a
ClassLabel (class names from the file's own `huggingface` schema metadata, else
dataset_info.json, else README.md's YAML) or strings (names sorted alphabetically, as class
folders are). Split names map onto ours (`validation`, `valid`, `dev` -> val). Images are read
when a shard is written (`read_image`), one column of one file at a time.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data_pipelines import sources
from data_pipelines import storage

_SPLIT_WORD = re.compile(r"^(%s)(?=$|[-._ 0-9])" % "|".join(
    sorted(sources.SPLIT_ALIASES, key=len, reverse=True)))


def _pa():
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
  return pyarrow


def _read_table(path: str, columns: Optional[Sequence[str]] = None):
  pa = _pa()
  try:
    if path.endswith(".parquet"):
      return pa.parquet.read_table(path, columns=columns)
    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()   # datasets' arrow files
    return table.select(columns) if columns else table
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path} cannot be read as a {os.path.splitext(path)[1][1:]} file: "
                     f"{e}") from None


def _schema(path: str):
  pa = _pa()
  try:
    if path.endswith(".parquet"):
      return pa.parquet.read_schema(path)
    with pa.memory_map(path) as f:
      return pa.ipc.open_stream(f).schema
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path} cannot be read as a {os.path.splitext(path)[1][1:]} file: "
                     f"{e}") from None


@functools.lru_cache(maxsize=2)
def _column(path: str, column: str):
  return _read_table(path, [column]).column(column)


def read_image(path: str, column: str, row: int) -> bytes:
  """The encoded image in `column` of row `row` of the parquet or arrow file `path`. An image
  stored as a path is read from that file (absolute, or relative to the data file's folder or
  one of the three folders above it)."""
  value = _column(path, column)[row].as_py()
  if isinstance(value, dict):
    if value.get("bytes") is not None:
      return value["bytes"]
    value = value.get("path")
  if isinstance(value, bytes):
    return value
  if not value:
    raise ValueError(f"{path} row {row}: column {column!r} holds neither bytes nor a path")
  bases = [os.path.dirname(os.path.abspath(path))]
  for _ in range(3):
    bases.append(os.path.dirname(bases[-1]))
  for candidate in [value] if os.path.isabs(value) else [os.path.join(b, value) for b in bases]:
    if os.path.isfile(candidate):
      with open(candidate, "rb") as f:
        return f.read()
  raise FileNotFoundError(f"{path} row {row}: the image is stored as the path {value!r}, "
                          "which does not exist" + ("" if os.path.isabs(value) else
                                                    f" under {bases[0]} or its parents"))


def _metadata_features(path: str) -> Optional[Dict[str, Any]]:
  """The `datasets` features a parquet or arrow file carries in its schema metadata."""
  meta = _schema(path).metadata or {}
  raw = meta.get(b"huggingface")
  if not raw:
    return None
  try:
    data = json.loads(raw)
  except ValueError:
    return None
  return (data.get("info") or {}).get("features")


def _readme_yaml(root: str) -> Dict[str, Any]:
  path = os.path.join(root, "README.md")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    text = f.read()
  match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
  if not match:
    return {}
  import yaml  # pylint: disable=g-import-not-at-top
  try:
    data = yaml.safe_load(match.group(1))
  except yaml.YAMLError as e:
    raise ValueError(f"{path}: its YAML header cannot be read: {e}") from None
  return data if isinstance(data, dict) else {}


def _pick_config(items: List[Dict[str, Any]], config: str, where: str) -> Dict[str, Any]:
  names = [c.get("config_name", "default") for c in items]
  if config:
    if config not in names:
      raise ValueError(f"--hf_config {config!r} is not in {where} (configs: {names})")
    return items[names.index(config)]
  chosen = [c for c in items if c.get("default")] or [
      c for c in items if c.get("config_name", "default") == "default"]
  if chosen or len(items) == 1:
    return (chosen or items)[0]
  raise ValueError(f"{where} has the configs {names} and none is the default: choose one "
                   "with --hf_config")


def _readme_features(card: Dict[str, Any], config: str, path: str) -> Optional[Dict[str, Any]]:
  """README's `dataset_info` features in the form of the files' metadata ({name: feature})."""
  info = card.get("dataset_info")
  if not info:
    return None
  if isinstance(info, list):
    info = _pick_config(info, config, f"{path} dataset_info")
  out = {}
  for feature in info.get("features") or []:
    dtype = feature.get("dtype")
    if isinstance(dtype, dict) and "class_label" in dtype:
      names = dtype["class_label"].get("names") or {}
      out[feature["name"]] = {"_type": "ClassLabel",
                              "names": [names[k] for k in sorted(names, key=int)]}
    elif dtype == "image":
      out[feature["name"]] = {"_type": "Image"}
    elif isinstance(dtype, str):
      out[feature["name"]] = {"_type": "Value", "dtype": dtype}
  return out


def _split_of(rel: str) -> Optional[str]:
  """Our split for a data file named as the hub names them, or None."""
  parts = rel.split(os.sep)
  for part in parts[:-1] + [os.path.splitext(parts[-1])[0]]:
    match = _SPLIT_WORD.match(part.lower())
    if match:
      return sources.SPLIT_ALIASES[match.group(1)]
  return None


def _parquet_files(root: str, card: Dict[str, Any], config: str, plan: sources.Plan
                   ) -> Tuple[Dict[str, List[str]], str]:
  """{our split: data files} of a hub parquet folder, and where the split came from."""
  readme = os.path.join(root, "README.md")
  if card.get("configs"):
    chosen = _pick_config(card["configs"], config, f"{readme} configs")
    out: Dict[str, List[str]] = {}
    for spec in chosen.get("data_files") or []:
      patterns = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
      found = sorted({f for p in patterns for f in glob.glob(os.path.join(root, p))})
      split = sources.our_split(spec["split"])
      if not found:
        plan.problems.append(f"{readme}: split {spec['split']!r} names {patterns}, which "
                             "match no file; split skipped")
      out.setdefault(split, []).extend(found)
    return out, f"README.md configs ({chosen.get('config_name', 'default')})"
  out = {}
  for f in sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)):
    rel = os.path.relpath(f, root)
    split = _split_of(rel)
    if split is None:
      plan.skipped.append({"path": rel, "reason": "a parquet file whose name or folder names "
                           "no split (train, validation, test, ...); not converted"})
    else:
      out.setdefault(split, []).append(f)
  return out, "file names"


def _arrow_files(folder: str) -> List[str]:
  state_path = os.path.join(folder, "state.json")
  state = storage.read_json(state_path, "save_to_disk state")
  files = [os.path.join(folder, d["filename"]) for d in state.get("_data_files", [])]
  if not files:
    raise ValueError(f"{state_path} lists no _data_files")
  return files


def _disk_files(root: str, plan: sources.Plan) -> Tuple[Dict[str, List[str]], str]:
  dict_path = os.path.join(root, "dataset_dict.json")
  if os.path.exists(dict_path):
    names = storage.read_json(dict_path, "save_to_disk dataset dict").get("splits") or []
    return ({sources.our_split(s): _arrow_files(os.path.join(root, s))
             for s in names}, "save_to_disk DatasetDict (dataset_dict.json)")
  state = storage.read_json(os.path.join(root, "state.json"), "save_to_disk state")
  split = state.get("_split")
  if not split:
    plan.problems.append(f"{os.path.join(root, 'state.json')} names no split: read as train")
    split = "train"
  return ({sources.our_split(split): _arrow_files(root)},
          "save_to_disk Dataset (state.json)")


def _check_image_column(path: str, column: str) -> None:
  pa = _pa()
  schema = _schema(path)
  if column not in schema.names:
    raise ValueError(f"{path} has no column {column!r} (--image_column); its columns are "
                     f"{schema.names}")
  kind = schema.field(column).type
  if pa.types.is_struct(kind):
    if {kind.field(i).name for i in range(kind.num_fields)} >= {"bytes", "path"}:
      return
  elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind):
    return
  raise ValueError(f"{path}: column {column!r} (--image_column) is {kind}, not an image "
                   "({bytes, path}, bytes or a path string)")


def plan(root: str, name: str, splits: Sequence[str] = sources.SPLITS,
         image_column: str = "image", label_column: str = "label", config: str = ""
         ) -> sources.Plan:
  """The records of a Hugging Face dataset folder (either layout), one per row."""
  sources.require_dir(root, "--root")
  result = sources.Plan(name, [], [])
  card = _readme_yaml(root)
  if os.path.exists(os.path.join(root, "dataset_dict.json")) or os.path.exists(
      os.path.join(root, "state.json")):
    files, where = _disk_files(root, result)
    layout = f"Hugging Face {where}"
  else:
    files, where = _parquet_files(root, card, config, result)
    layout = f"Hugging Face hub parquet, splits from {where}"
  if not any(files.values()):
    raise FileNotFoundError(f"--root {root} holds no Hugging Face dataset: no "
                            "dataset_dict.json or state.json (save_to_disk), and no parquet "
                            "file named by split (data/train-00000-of-00001.parquet)")
  for split in splits:
    if split not in files:
      result.problems.append(f"no {split!r} split in {root}")
  wanted = [s for s in files if s in splits or s not in sources.SPLITS]
  # Class names: the data files' own metadata, then dataset_info.json, then README.md.
  features, names_from = None, ""
  for split in wanted:
    for f in files[split]:
      features = features or _metadata_features(f)
      names_from = names_from or (features and f"{os.path.relpath(f, root)} schema metadata")
  info_path = os.path.join(root, "dataset_info.json")
  if features is None and os.path.exists(info_path):
    features = storage.read_json(info_path, "dataset info").get("features")
    names_from = "dataset_info.json"
  if features is None:
    features = _readme_features(card, config, os.path.join(root, "README.md"))
    names_from = "README.md dataset_info" if features else ""
  label_feature = (features or {}).get(label_column) or {}
  class_names = list(label_feature.get("names") or [])

  rows: List[Tuple[str, str, int, Any]] = []
  for split in wanted:
    for f in files[split]:
      _check_image_column(f, image_column)
      names = _schema(f).names
      if label_column not in names:
        raise ValueError(f"{f} has no column {label_column!r} (--label_column); its columns "
                         f"are {names}")
      # The labels alone: the images are read shard by shard when records are written.
      labels = _read_table(f, [label_column]).column(label_column).to_pylist()
      rows += [(split, f, i, v) for i, v in enumerate(labels)]
  strings = sorted({v for _, _, _, v in rows if isinstance(v, str)})
  if not class_names:
    if rows and len(strings) == len({v for _, _, _, v in rows if v is not None}):
      class_names, names_from = strings, f"the strings of column {label_column!r}"
    else:
      raise ValueError(f"{root}: column {label_column!r} holds integer labels and no class "
                       "names were found (its ClassLabel feature in the files' metadata, "
                       "dataset_info.json or README.md)")
  result.class_names = class_names
  unlabelled: Dict[str, int] = {}
  for split, f, i, value in rows:
    if value is None or value == -1:          # ClassLabel's -1: no label (hub test splits)
      unlabelled[split] = unlabelled.get(split, 0) + 1
      continue
    if isinstance(value, str):
      if value not in class_names:
        raise ValueError(f"{f} row {i}: label {value!r} is not one of the class names "
                         f"{class_names} ({names_from})")
      label = class_names.index(value)
    else:
      label = int(value)
      if not 0 <= label < len(class_names):
        raise ValueError(f"{f} row {i}: label {label} is outside the {len(class_names)} "
                         f"classes ({names_from})")
    rel = f"{os.path.relpath(f, root)}[{i}]"
    result.entries.append(sources.Entry(split, f, rel, label, class_names[label], row=i,
                                        column=image_column))
  for split, n in unlabelled.items():
    result.problems.append(f"{n} row(s) of split {split!r} have no label (-1 or empty); "
                           "left out")
  result.layout = f"{layout}; class names from {names_from}"
  return result

"""The converted datasets as TensorFlow Datasets datasets.

A folder written by `data_pipelines.convert` is laid out as a TFDS prepared dataset: shards
named `<name>-<split>.tfrecord-NNNNN-of-MMMMM` (TFDS's default template), and beside them
`dataset_info.json` and `features.json` (written here, with `tfds.folder_dataset.
write_metadata`), so that

  tfds.builder_from_directory("<data_dir>/<name>/<version>").as_dataset(split="train")
  tfds.load("<name>", data_dir="<data_dir>")          # when --out is <data_dir>/<name>/<version>

return the records our grain pipelines read. Our own files (indexes, stats, uniemox_info.json,
conversion_report.json) sit beside them; TFDS ignores them.

The record schema (`records.py`) as TFDS features: image (Image, bytes stored as given),
label (ClassLabel with the class names; an int64 Scalar, -1, for multi-label data), labels
(int64 Tensor [C], multi-label), person_box (BBoxFeature: [ymin, xmin, ymax, xmax] relative),
has_person (int64 Scalar), text_emb (float32 Tensor [D], when stored), the rest Text.

The reverse direction - a dataset built by TFDS (`tfds build`, see `tfds_builders.py`) read by
our grain pipelines - is `info_from_tfds`, which derives our dataset info from TFDS's.

TensorFlow Datasets (and so TensorFlow) is imported only by these functions: the conversion
tool and users call them, the training process and the grain workers never do.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from data_pipelines import storage

DATASET_INFO_FILE = "dataset_info.json"
FEATURES_FILE = "features.json"
DEFAULT_VERSION = "1.0.0"


def features(class_names: Sequence[str], multi_label: bool = False,
             text_emb_dim: Optional[int] = None):
  """The `tfds.features.FeaturesDict` of a converted dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  spec = {
      "image": f.Image(shape=(None, None, 3)),
      "image_id": f.Text(),
      "source_path": f.Text(),
      "label": f.Scalar(dtype=np.int64) if multi_label else f.ClassLabel(names=list(
          class_names)),
      "label_name": f.Text(),
      "prompt": f.Text(),
      "attributes": f.Text(),
      "person_box": f.BBoxFeature(),
      "has_person": f.Scalar(dtype=np.int64),
  }
  if multi_label:
    spec["labels"] = f.Tensor(shape=(len(class_names),), dtype=np.int64)
  if text_emb_dim:
    spec["text_emb"] = f.Tensor(shape=(int(text_emb_dim),), dtype=np.float32)
  return f.FeaturesDict(spec)


def write_metadata(out: str, info, version: Optional[str] = None,
                   description: str = "") -> None:
  """Writes dataset_info.json and features.json for the shards that `info` lists."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  version = version or _version_of(out)
  split_infos = []
  for split, s in sorted(info.splits.items()):
    template = naming.ShardedFileTemplate(data_dir=out, dataset_name=info.name, split=split,
                                          filetype_suffix="tfrecord")
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[sh.records for sh in s.shards],
        num_bytes=sum(sh.bytes for sh in s.shards), filename_template=template))
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=features(list(info.class_names), info.multi_label,
                                      info.text_emb_dim),
      split_infos=split_infos, version=version, check_data=False,
      description=description or f"{info.name}, converted by data_pipelines.convert "
                                 "(uniemox-jax); schema in data_pipelines/records.py")


def _version_of(out: str) -> str:
  """The version a folder's name gives (TFDS's <name>/<version>/ layout), else 1.0.0."""
  base = os.path.basename(os.path.normpath(out))
  parts = base.split(".")
  if len(parts) == 3 and all(p.isdigit() for p in parts):
    return base
  return DEFAULT_VERSION


def is_tfds_dir(data_dir: str) -> bool:
  return storage.exists(storage.join(data_dir, DATASET_INFO_FILE))


def info_from_tfds(data_dir: str) -> Dict[str, Any]:
  """Our dataset info (the `uniemox_info.json` fields the pipelines read) from a TFDS-built
  folder's dataset_info.json and features.json. Reads JSON only: no TensorFlow."""
  damaged = "the TFDS metadata is damaged; rebuild the dataset (tfds build, or " \
      "data_pipelines.tfds_builders)"
  ds_info = storage.read_json(storage.join(data_dir, DATASET_INFO_FILE), damaged=damaged)
  feats_path = storage.join(data_dir, FEATURES_FILE)
  feats = storage.read_json(feats_path, "the TFDS features file", damaged=damaged)
  spec = _feature_spec(feats)
  missing = {"image", "label", "prompt", "person_box", "has_person"} - set(spec)
  if missing:
    raise ValueError(f"{feats_path} lacks the features {sorted(missing)}: not a dataset with "
                     "this project's schema (data_pipelines/records.py)")
  label = spec["label"]
  multi = "labels" in spec
  if multi:
    num_classes = spec["labels"]["tensor"]["shape"]["dimensions"][0]
    class_names = _names_file(data_dir, "labels") or [str(i) for i in range(int(num_classes))]
  else:
    class_names = label["classLabel"].get("names") or _names_file(data_dir, "label")
  text_dim = None
  if "text_emb" in spec:
    text_dim = int(spec["text_emb"]["tensor"]["shape"]["dimensions"][0])
  name = ds_info["name"]
  splits = {}
  for s in ds_info.get("splits", []):
    lengths = [int(x) for x in s.get("shardLengths", [])]
    n = len(lengths)
    splits[s["name"]] = {
        "num_records": sum(lengths),
        "shards": [{"file": f"{name}-{s['name']}.tfrecord-{i:05d}-of-{n:05d}",
                    "records": length} for i, length in enumerate(lengths)],
    }
  return {"format_version": 1, "name": name, "class_names": list(class_names),
          "multi_label": multi, "features": sorted(spec), "text_emb_dim": text_dim,
          "splits": splits, "source": "tfds"}


def _feature_spec(feats: Dict[str, Any]) -> Dict[str, Any]:
  """features.json -> {feature name: its JSON spec}."""
  content = feats.get("featuresDict", {}).get("features", {})
  return {name: spec for name, spec in content.items()}


def _names_file(data_dir: str, feature: str) -> List[str]:
  path = storage.join(data_dir, f"{feature}.labels.txt")
  if not storage.exists(path):
    return []
  return [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]

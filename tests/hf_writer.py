"""Writes Hugging Face dataset folders with the `datasets` library itself, and what `datasets`
reads back from them, for tests/test_hf_datasets.py.

Run by the Python of an environment of its own (`make test` builds .venv/hf-writer:
datasets 5.x cannot share ours, docs/decisions.md), never imported by the tests:

  .venv/hf-writer/bin/python tests/hf_writer.py OUT

OUT/<fixture>/ is a dataset folder; OUT/truth.json holds, per fixture, the class names and, per
split, the label and pixel checksum of every row as `datasets` loads them (load_dataset on
the folder, or load_from_disk).

  hub          hub parquet with a README card as push_to_hub writes it (configs, dataset_info):
               train in two shards, validation, and a test split whose last row is unlabelled
  hub_bare     hub parquet without the files' schema metadata (as another writer leaves
               them) and a card without `configs`: class names from the card, splits from the
               file names, no test split, images stored as paths relative to the folder
  disk_dict    DatasetDict.save_to_disk, a string label column `emotion`, the image column
               `picture`, no test split
  disk_single  Dataset.save_to_disk of one split (test)
  tables       a folder of images and its label tables as pandas writes them (to_csv,
               to_json records and lines): columns path, emotion, split; truth.json's
               "tables" lists the rows
"""
import hashlib
import io
import json
import os
import sys

import datasets
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData
import numpy as np
import pandas as pd
from PIL import Image
import pyarrow.parquet as pq

CLASSES = ["amusement", "anger", "awe"]
FEATURES = datasets.Features({"image": datasets.Image(),
                              "label": datasets.ClassLabel(names=CLASSES)})


def _png(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _rows(split: str, n: int, start: int):
  return {"image": [{"bytes": _png(start + i), "path": f"{split}_{i}.png"} for i in range(n)],
          "label": [(start + i) % len(CLASSES) for i in range(n)]}


def _hub_card(out: str, dd: datasets.DatasetDict, configs: bool) -> None:
  """README.md as push_to_hub writes it: the features and splits, and the data files."""
  card = DatasetCardData()
  info = datasets.DatasetInfo(features=dd["train"].features, splits=datasets.SplitDict())
  for split, ds in dd.items():
    info.splits.add(datasets.SplitInfo(name=split, num_examples=len(ds)))
  DatasetInfosDict({"default": info}).to_dataset_card_data(card)
  if configs:
    MetadataConfigs({"default": {"data_files": [
        {"split": s, "path": f"data/{s}-*"} for s in dd]}}).to_dataset_card_data(card)
  DatasetCard(f"---\n{card}\n---\n\n# A fixture of uniemox-jax's tests\n").save(
      os.path.join(out, "README.md"))


def write_hub(out: str) -> None:
  dd = datasets.DatasetDict({
      "train": datasets.Dataset.from_dict(_rows("train", 10, 0), features=FEATURES),
      "validation": datasets.Dataset.from_dict(_rows("validation", 4, 100), features=FEATURES),
      "test": datasets.Dataset.from_dict(_rows("test", 4, 200), features=FEATURES)})
  # The hub's test splits often come without labels: ClassLabel's -1.
  dd["test"] = dd["test"].map(lambda row, i: {"label": -1 if i == 3 else row["label"]},
                              with_indices=True, features=FEATURES)
  os.makedirs(os.path.join(out, "data"))
  for split, ds in dd.items():
    n = 2 if split == "train" else 1
    for i in range(n):
      ds.shard(n, i, contiguous=True).to_parquet(
          os.path.join(out, "data", f"{split}-{i:05d}-of-{n:05d}.parquet"))
  _hub_card(out, dd, configs=True)


def write_hub_bare(out: str) -> None:
  os.makedirs(os.path.join(out, "images"))
  here = os.getcwd()
  os.chdir(out)               # the relative image paths are relative to the folder
  try:
    _write_hub_bare(out)
  finally:
    os.chdir(here)


def _write_hub_bare(out: str) -> None:
  dd = datasets.DatasetDict()
  for split, n, start in (("train", 6, 300), ("validation", 3, 400)):
    paths = []
    for i in range(n):
      rel = f"images/{split}_{i}.png"
      with open(os.path.join(out, rel), "wb") as f:
        f.write(_png(start + i))
      paths.append(rel)
    dd[split] = datasets.Dataset.from_dict(
        {"image": paths, "label": [(start + i) % 3 for i in range(n)]}, features=FEATURES)
  os.makedirs(os.path.join(out, "data"))
  for split, ds in dd.items():
    path = os.path.join(out, "data", f"{split}-00000-of-00001.parquet")
    ds.to_parquet(path)
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
  _hub_card(out, dd, configs=False)


def write_disk_dict(out: str) -> None:
  features = datasets.Features({"picture": datasets.Image(), "emotion": datasets.Value("string")})
  dd = datasets.DatasetDict()
  for split, n, start in (("train", 7, 500), ("validation", 3, 600)):
    rows = _rows(split, n, start)
    dd[split] = datasets.Dataset.from_dict(
        {"picture": rows["image"], "emotion": [CLASSES[x] for x in rows["label"]]},
        features=features)
  dd.save_to_disk(out)


def write_disk_single(out: str) -> None:
  ds = datasets.Dataset.from_dict(_rows("test", 5, 700), features=FEATURES,
                                  split=datasets.Split.TEST)
  ds.save_to_disk(out)


def write_tables(out: str):
  """Images under out/images/<emotion>/ and the tables listing them; returns the rows."""
  rows = []
  for i in range(24):
    emotion = CLASSES[i % 3]
    rel = f"images/{emotion}/{i:02d}.png"
    os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
    with open(os.path.join(out, rel), "wb") as f:
      f.write(_png(800 + i))
    rows.append({"path": rel, "emotion": emotion,
                 "split": ["train", "train", "validation", "test"][(i // 3) % 4]})
  frame = pd.DataFrame(rows)
  frame.to_csv(os.path.join(out, "labels.csv"), index=False)
  frame.to_json(os.path.join(out, "labels.jsonl"), orient="records", lines=True)
  frame.to_json(os.path.join(out, "labels.json"), orient="records")
  return rows


def _pixels(image) -> str:
  return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def truth(root: str, from_disk: bool, image: str = "image", label: str = "label"):
  """What `datasets` reads from the folder: class names, and per split (label, pixels)."""
  here = os.getcwd()
  os.chdir(root)              # relative image paths resolve from the folder, as on the hub
  try:
    loaded = datasets.load_from_disk(root) if from_disk else datasets.load_dataset(root)
  finally:
    os.chdir(here)
  if isinstance(loaded, datasets.Dataset):
    loaded = {str(loaded.split): loaded}
  names = None
  out = {}
  for split, ds in loaded.items():
    feature = ds.features[label]
    names = getattr(feature, "names", None)
    os.chdir(root)
    try:
      out[split] = [[row[label], _pixels(row[image])] for row in ds]
    finally:
      os.chdir(here)
  return {"class_names": names, "splits": out}


def main(out: str) -> None:
  os.makedirs(out, exist_ok=True)
  write_hub(os.path.join(out, "hub"))
  write_hub_bare(os.path.join(out, "hub_bare"))
  write_disk_dict(os.path.join(out, "disk_dict"))
  write_disk_single(os.path.join(out, "disk_single"))
  result = {"datasets_version": datasets.__version__,
            "hub": truth(os.path.join(out, "hub"), False),
            "hub_bare": truth(os.path.join(out, "hub_bare"), False),
            "disk_dict": truth(os.path.join(out, "disk_dict"), True, "picture", "emotion"),
            "disk_single": truth(os.path.join(out, "disk_single"), True),
            "tables": write_tables(os.path.join(out, "tables"))}
  with open(os.path.join(out, "truth.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])

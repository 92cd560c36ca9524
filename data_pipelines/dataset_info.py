"""What a converted folder holds, as its info file records it: one typed record that every layer
reads (`DatasetInfo.load`), instead of a dict read by key in many places.

The file (`uniemox_info.json`, written by the converter, `index_tfrecords`, or derived from a
TFDS folder's metadata) keeps its layout: `to_json` writes the keys it was read with, in the
converter's order, so a folder written before this module reads and saves unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Optional, Tuple

from data_pipelines import storage
from data_pipelines import tfds_format

INFO_FILE = "uniemox_info.json"


@dataclasses.dataclass(frozen=True)
class Shard:
  file: str
  records: int
  bytes: Optional[int] = None        # absent in folders built by `tfds build`
  sha256: Optional[str] = None

  def to_json(self) -> Dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Split:
  num_records: int
  shards: Tuple[Shard, ...]
  class_counts: Optional[Tuple[int, ...]] = None
  with_person: Optional[int] = None

  def to_json(self) -> Dict[str, Any]:
    out = {"num_records": self.num_records, "with_person": self.with_person,
           "class_counts": None if self.class_counts is None else list(self.class_counts),
           "shards": [s.to_json() for s in self.shards]}
    return {k: v for k, v in out.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  class_names: Tuple[str, ...]
  splits: Mapping[str, Split]
  multi_label: bool = False
  features: Tuple[str, ...] = ()
  text_emb_dim: Optional[int] = None
  format_version: Optional[int] = None
  source: Optional[str] = None       # "tfds" (built by `tfds build`), "indexed", or None: ours
  split_ids: bool = True             # whether every record id starts with "<split>/"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def num_examples(self, split: str) -> int:
    """Records of a split, or of several joined by '+' ("train+val"); absent ones count 0."""
    return sum(self.splits[s].num_records for s in split.split("+") if s in self.splits)

  def check_splits(self, data_dir: str, fields: Mapping[str, str]) -> None:
    """Every split of `fields` ({split: the flag or config field naming it}) is in the data."""
    for split, field in fields.items():
      if split not in self.splits:
        raise ValueError(f"{field}: the split {split!r} is not in {data_dir} (it has "
                         f"{', '.join(sorted(self.splits))})")

  @classmethod
  def from_json(cls, data: Mapping[str, Any], path: str = INFO_FILE) -> "DatasetInfo":
    """The record of a parsed info file; `path` names it when it is not one."""
    if not isinstance(data, Mapping) or not isinstance(data.get("splits"), Mapping):
      raise ValueError(f"{path} has no 'splits' mapping: not a dataset info file written by "
                       "the conversion (data_pipelines.convert)")
    try:
      splits = {name: Split(int(s["num_records"]),
                            tuple(Shard(**shard) for shard in s["shards"]),
                            tuple(s["class_counts"]) if "class_counts" in s else None,
                            s.get("with_person"))
                for name, s in data["splits"].items()}
      return cls(name=data.get("name", ""), class_names=tuple(data.get("class_names") or ()),
                 splits=splits, multi_label=bool(data.get("multi_label")),
                 features=tuple(data.get("features") or ()),
                 text_emb_dim=data.get("text_emb_dim"),
                 format_version=data.get("format_version"), source=data.get("source"),
                 split_ids=bool(data.get("split_ids", True)))
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path} is not a dataset info file of this schema ({e!r}): rerun the "
                       "conversion that wrote it (finished shards are kept)") from None

  def to_json(self) -> Dict[str, Any]:
    out: Dict[str, Any] = {"format_version": self.format_version, "name": self.name,
                           "class_names": list(self.class_names),
                           "multi_label": self.multi_label, "features": list(self.features),
                           "text_emb_dim": self.text_emb_dim,
                           "splits": {k: s.to_json() for k, s in self.splits.items()}}
    if self.source is not None:
      out.update(source=self.source, **({} if self.source == "tfds" else
                                        {"split_ids": self.split_ids}))
    return out

  def save(self, data_dir: str) -> str:
    path = storage.join(data_dir, INFO_FILE)
    storage.write_text(path, json.dumps(self.to_json(), indent=1))
    return path

  @classmethod
  def load(cls, data_dir: str, field: str = "") -> "DatasetInfo":
    """The info of a folder written by the conversion, or derived from the TFDS metadata of
    one built by `tfds build` (data_pipelines/tfds_builders.py). `field` names where the
    folder came from (a flag or config field), for the error messages."""
    path = storage.join(data_dir, INFO_FILE)
    if not storage.exists(path):
      if tfds_format.is_tfds_dir(data_dir):
        return cls.from_json(tfds_format.info_from_tfds(data_dir), data_dir)
      where = f"{field} {data_dir}" if field else data_dir
      what = "does not exist" if not storage.exists(data_dir) else \
          f"holds no converted dataset ({INFO_FILE} missing)"
      raise FileNotFoundError(f"{where} {what}: it must be a folder written by `python -m "
                              "uniemox_jax.tools.convert` (or a TFDS dataset folder with "
                              "dataset_info.json)")
    return cls.from_json(storage.read_json(path, damaged="the folder's dataset info is "
                                           "damaged; rerun the conversion that wrote it "
                                           "(finished shards are kept)"), path)

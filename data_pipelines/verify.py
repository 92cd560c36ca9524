r"""Checks a converted folder against everything its info file claims.

  python -m data_pipelines.verify /data/tfrecords/emo8 [--decode_images]

For every split and shard listed in `uniemox_info.json`: the shard exists, its byte size and
sha256 are the recorded ones, its index describes it, the index's record count is the
recorded one; every record's two CRCs hold, it parses with the schema of `records.py`, its
id belongs to the split, its label is one of the class list's (and its label name that class's
name), its multi-hot labels and text embedding have the recorded sizes; the per-class counts
and the split totals add up; no shard of the dataset lies in the folder unlisted. With
`--decode_images`, every image is decoded too (to 3-channel RGB). Prints a summary and exits 1
naming every problem, 0 when there is none. The conversion ends by running it.

`check_split` is the cheap part (sizes and index counts against the info file, and the split
of each shard's first record), run whenever a pipeline opens a split.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Dict, List, Optional

from data_pipelines import dataset_info
from data_pipelines import records
from data_pipelines import storage
from data_pipelines import tfrecord



class DatasetMismatchError(tfrecord.CorruptRecordError):
  """A shard that is not what the folder's info file says it is."""


def _fix_hint(data_dir: str) -> str:
  return (f"run `python -m data_pipelines.verify {data_dir}` for every problem, then rerun "
          "the conversion (it rewrites damaged shards)")


def check_split(data_dir: str, info: dataset_info.DatasetInfo, split: str) -> List[str]:
  """Paths of the non-empty shards of `split` (one split), after the checks that cost no more
  than a stat, the index and one record per shard. Raises `DatasetMismatchError` naming the
  shard when the folder disagrees with its info file.
  A remote folder's shards are checked and returned as their copies in this host's cache
  (`tfrecord.local_shard`), whose sha256 is checked once, when copied."""
  paths = []
  for entry in info.splits[split].shards:
    path = storage.join(data_dir, entry.file)
    if not storage.exists(path):
      raise FileNotFoundError(f"shard {path} of split {split!r} (listed in "
                              f"{storage.join(data_dir, dataset_info.INFO_FILE)}) does not exist")
    path = tfrecord.local_shard(path, entry.bytes, entry.sha256)
    size = os.path.getsize(path)
    if entry.bytes is not None and size != entry.bytes:
      raise DatasetMismatchError(
          f"shard {path} is {size} bytes; {dataset_info.INFO_FILE} says {entry.bytes}: the file was "
          f"replaced or damaged after conversion; {_fix_hint(data_dir)}")
    reader = tfrecord.RandomAccessReader([path], scan_if_missing=info.source == "tfds")
    count = len(reader)
    if count != entry.records:
      raise DatasetMismatchError(
          f"shard {path} holds {count} records; {dataset_info.INFO_FILE} says {entry.records}; "
          f"{_fix_hint(data_dir)}")
    if not count:
      continue
    if info.split_ids:
      first = records.parse(reader[0])
      if not first["image_id"].startswith(f"{split}/"):
        raise DatasetMismatchError(
            f"shard {path} is listed under split {split!r} but its first record is "
            f"{first['image_id']!r}: a shard of another split under this name; "
            f"{_fix_hint(data_dir)}")
    paths.append(path)
  return paths


@dataclasses.dataclass
class Report:
  data_dir: str
  problems: List[str] = dataclasses.field(default_factory=list)
  splits: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return not self.problems

  def summary(self) -> str:
    lines = [f"{self.data_dir}:"]
    for split, s in self.splits.items():
      lines.append(f"  {split}: {s['records']} records checked in {s['shards']} shards")
    if self.ok:
      lines.append("  OK: every shard, index, record and count agrees with "
                   f"{dataset_info.INFO_FILE}")
    else:
      lines.append(f"  {len(self.problems)} problem(s):")
      lines += [f"  - {p}" for p in self.problems]
    return "\n".join(lines)


def _check_record(rec: Dict[str, Any], split: str, info: dataset_info.DatasetInfo, where: str,
                  counts: List[int], problems: List[str], decode: bool) -> None:
  names = info.class_names
  if info.split_ids and not rec["image_id"].startswith(f"{split}/"):
    problems.append(f"{where}: id {rec['image_id']!r} is not of split {split!r}")
  if info.multi_label:
    labels = rec.get("labels")
    if labels is None or len(labels) != len(names):
      problems.append(f"{where}: multi-hot labels of size "
                      f"{None if labels is None else len(labels)}, expected {len(names)}")
    elif not set(labels.tolist()) <= {0, 1}:
      problems.append(f"{where}: multi-hot labels {labels.tolist()} are not 0/1")
    else:
      for c, on in enumerate(labels.tolist()):
        counts[c] += on
  else:
    label = rec["label"]
    if not 0 <= label < len(names):
      problems.append(f"{where}: label {label} is outside the {len(names)} classes")
    else:
      counts[label] += 1
      if rec["label_name"] and rec["label_name"] != names[label]:
        problems.append(f"{where}: label {label} is named {rec['label_name']!r}, the class "
                        f"list says {names[label]!r}")
  dim = info.text_emb_dim
  if dim and ("text_emb" not in rec or rec["text_emb"].shape != (dim,)):
    problems.append(f"{where}: text embedding missing or not of size {dim}")
  if decode:
    from data_pipelines import transforms  # pylint: disable=g-import-not-at-top
    try:
      arr = transforms.to_array(transforms.decode(rec["image"]))
      if arr.ndim != 3 or arr.shape[2] != 3:
        problems.append(f"{where}: image decodes to shape {arr.shape}, not RGB")
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{where}: image does not decode ({type(e).__name__}: {e})")


def _check_shard(data_dir: str, info: dataset_info.DatasetInfo, split: str,
                 entry: dataset_info.Shard, counts: List[int], problems: List[str],
                 decode: bool) -> int:
  """Checks one shard fully; returns the records it holds (0 when it cannot be read)."""
  path = storage.join(data_dir, entry.file)
  if not storage.exists(path):
    problems.append(f"{path}: listed in {dataset_info.INFO_FILE} under {split!r} but missing")
    return 0
  path = tfrecord.local_shard(path)     # a remote shard: its copy, checked below
  size = os.path.getsize(path)
  if entry.bytes is not None and size != entry.bytes:
    problems.append(f"{path}: {size} bytes, {dataset_info.INFO_FILE} says {entry.bytes}")
  if entry.sha256 is not None:
    digest = tfrecord.file_sha256(path)
    if digest != entry.sha256:
      problems.append(f"{path}: sha256 {digest[:16]}..., {dataset_info.INFO_FILE} says "
                      f"{entry.sha256[:16]}...")
  try:
    reader = tfrecord.RandomAccessReader([path], scan_if_missing=info.source == "tfds")
  except (OSError, ValueError) as e:
    problems.append(str(e))
    return 0
  if len(reader) != entry.records:
    problems.append(f"{path}: {len(reader)} records in its index, {dataset_info.INFO_FILE} says "
                    f"{entry.records}")
  bad = 0
  for i in range(len(reader)):
    where = f"{path} record {i}"
    try:
      rec = records.parse(reader[i])
    except tfrecord.CorruptRecordError as e:
      problems.append(str(e))
      bad += 1
      continue
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{where}: does not parse as a record of this schema "
                      f"({type(e).__name__}: {e})")
      bad += 1
      continue
    _check_record(rec, split, info, where, counts, problems, decode)
  return len(reader) - bad


def verify(data_dir: str, decode_images: bool = False,
           splits: Optional[List[str]] = None) -> Report:
  """Every check of the module docstring; the problems are collected, not raised."""
  report = Report(data_dir)
  try:
    info = dataset_info.DatasetInfo.load(data_dir)
  except (OSError, ValueError) as e:
    report.problems.append(str(e))
    return report
  names = info.class_names
  listed = set()
  for split, s in info.splits.items():
    if splits and split not in splits:
      continue
    counts = [0] * len(names)
    total = 0
    for entry in s.shards:
      listed.add(entry.file)
      total += _check_shard(data_dir, info, split, entry, counts, report.problems,
                            decode_images)
    report.splits[split] = {"records": total, "shards": len(s.shards)}
    if sum(e.records for e in s.shards) != s.num_records:
      report.problems.append(f"split {split!r}: {dataset_info.INFO_FILE} says {s.num_records} records "
                             f"but its shards add up to {sum(e.records for e in s.shards)}")
    if s.class_counts is not None and list(s.class_counts) != counts:
      diff = [f"{names[c]} {s.class_counts[c]} listed, {n} found"
              for c, n in enumerate(counts) if c < len(s.class_counts)
              and s.class_counts[c] != n]
      report.problems.append(f"split {split!r}: class counts differ from {dataset_info.INFO_FILE}: "
                             + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))
  pattern = re.compile(re.escape(info.name) + r"-[^.]+\.tfrecord-\d{5}-of-\d{5}$")
  for f in sorted(storage.listdir(data_dir)):
    if pattern.match(f) and f not in listed and not splits:
      report.problems.append(f"{storage.join(data_dir, f)}: a shard of {info.name!r} "
                             f"that {dataset_info.INFO_FILE} does not list (left from another conversion?)")
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Check a converted dataset folder against its "
                              "info file.", epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("data_dir")
  p.add_argument("--decode_images", action="store_true",
                 help="also decode every image (slower)")
  p.add_argument("--splits", default="", help="comma-separated splits (default: all)")
  args = p.parse_args(argv)
  report = verify(args.data_dir, args.decode_images,
                  args.splits.split(",") if args.splits else None)
  print(report.summary())
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())


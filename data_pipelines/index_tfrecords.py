r"""Makes a folder of plain TFRecord files of our schema readable by the pipelines.

  python -m data_pipelines.index_tfrecords /data/my_tfrecords --name mydata
  python -m data_pipelines.index_tfrecords DIR --name mydata \
      --splits "train=part-train-*,val=part-val-*,test=held-out-*" --class_names a,b,c

The files may come from anywhere that writes TFRecords (`tf.io.TFRecordWriter`, another
converter) as long as each record is a `tf.train.Example` with the features of
`data_pipelines/records.py`. Nothing is rewritten: each file gets its `.index` beside it, and
the folder gets `uniemox_info.json` (splits, shards with sizes, sha256 and record counts, class
names and counts), built by reading every record once. The folder is then checked as
`python -m data_pipelines.verify` checks a converted one.

A file's split comes from `--splits` (shell patterns over file names; by default a file whose
name holds train, val or test). Class names come from the records' label names, or from
`--class_names` when the records carry none. Compressed TFRecords (GZIP, ZLIB) are refused:
the index addresses raw bytes, so decompress them first.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from data_pipelines import dataset_info
from data_pipelines import records
from data_pipelines import tfrecord
from data_pipelines import verify

DEFAULT_SPLITS = {"train": "*train*", "val": "*val*", "test": "*test*"}
_NOT_SHARDS = (tfrecord.INDEX_SUFFIX, ".json", ".txt", ".md")


def _parse_splits(text: str) -> Dict[str, str]:
  if not text:
    return dict(DEFAULT_SPLITS)
  out = {}
  for part in text.split(","):
    split, eq, pattern = part.partition("=")
    if not eq or not split or not pattern:
      raise ValueError(f"--splits {text!r}: expected split=pattern[,split=pattern...]")
    out[split.strip()] = pattern.strip()
  return out


def assign_splits(data_dir: str, patterns: Dict[str, str]) -> Dict[str, List[str]]:
  """{split: sorted file names}; a file that matches no pattern, or several, is named."""
  names = sorted(f for f in os.listdir(data_dir)
                 if os.path.isfile(os.path.join(data_dir, f)) and not f.startswith(".")
                 and not f.endswith(_NOT_SHARDS) and ".tmp" not in f)
  if not names:
    raise FileNotFoundError(f"{data_dir} holds no TFRecord files")
  out: Dict[str, List[str]] = {s: [] for s in patterns}
  for f in names:
    hits = [s for s, p in patterns.items() if fnmatch.fnmatch(f, p)]
    if len(hits) != 1:
      raise ValueError(f"{os.path.join(data_dir, f)} matches {'no' if not hits else hits} "
                       f"split pattern{'s' if len(hits) != 1 else ''} of --splits "
                       f"{patterns}; give --splits to say which split each file is")
    out[hits[0]].append(f)
  return {s: files for s, files in out.items() if files}


def index_folder(data_dir: str, name: str, split_patterns: Optional[Dict[str, str]] = None,
                 class_names: Sequence[str] = ()) -> dataset_info.DatasetInfo:
  """Writes the indexes and the info file; returns the info."""
  if os.path.exists(os.path.join(data_dir, dataset_info.INFO_FILE)):
    raise ValueError(f"{os.path.join(data_dir, dataset_info.INFO_FILE)} exists: {data_dir} is "
                     "already a dataset folder (check it with python -m data_pipelines.verify)")
  splits = assign_splits(data_dir, split_patterns or dict(DEFAULT_SPLITS))
  label_names: Dict[int, str] = {}
  num_labels, emb_dim, multi = None, None, False
  split_ids = True     # whether every image id starts with "<split>/", as ours do
  shards: Dict[str, List[Dict]] = {}
  per_record: Dict[str, List[np.ndarray]] = {}
  for split, files in splits.items():
    for f in files:
      path = os.path.join(data_dir, f)
      offsets = tfrecord.scan_offsets(path)     # names a compressed or damaged file
      np.asarray(offsets, "<u8").tofile(path + tfrecord.INDEX_SUFFIX)
      reader = tfrecord.RandomAccessReader([path])
      labels, with_person = [], 0
      for i in range(len(reader)):
        try:
          rec = records.parse(reader[i])
        except tfrecord.CorruptRecordError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          raise ValueError(f"{path} record {i} is not a record of this project's schema "
                           f"(data_pipelines/records.py): {type(e).__name__}: {e}") from None
        with_person += rec["has_person"]
        split_ids = split_ids and rec["image_id"].startswith(f"{split}/")
        if "labels" in rec:
          multi = True
          num_labels = len(rec["labels"])
          labels.append(rec["labels"])
        else:
          labels.append(np.asarray(rec["label"]))
          if rec["label_name"]:
            known = label_names.setdefault(rec["label"], rec["label_name"])
            if known != rec["label_name"]:
              raise ValueError(f"{path} record {i}: label {rec['label']} is named "
                               f"{rec['label_name']!r}, earlier records name it {known!r}")
        if "text_emb" in rec:
          emb_dim = int(rec["text_emb"].shape[0])
      shards.setdefault(split, []).append(
          {"file": f, "records": len(reader), "bytes": os.path.getsize(path),
           "sha256": tfrecord.file_sha256(path), "with_person": with_person})
      per_record.setdefault(split, []).extend(labels)
  names = _class_names(class_names, label_names, num_labels, multi)
  info_splits = {}
  for split, entries in shards.items():
    counts = np.zeros(len(names), np.int64)
    for lab in per_record[split]:
      if multi:
        counts += lab.astype(np.int64)
      elif 0 <= int(lab) < len(names):
        counts[int(lab)] += 1
      else:
        raise ValueError(f"split {split!r} holds label {int(lab)}, outside the "
                         f"{len(names)} classes {list(names)}")
    info_splits[split] = {"num_records": sum(e["records"] for e in entries),
                          "with_person": sum(e.pop("with_person") for e in entries),
                          "class_counts": counts.tolist(), "shards": entries}
  features = list(records.FEATURES)
  features += (["labels"] if multi else []) + (["text_emb"] if emb_dim else [])
  info = dataset_info.DatasetInfo.from_json({
      "format_version": 1, "name": name, "class_names": list(names), "multi_label": multi,
      "features": features, "text_emb_dim": emb_dim, "splits": info_splits,
      "source": "indexed", "split_ids": split_ids})
  info.save(data_dir)
  return info


def _class_names(given: Sequence[str], from_records: Dict[int, str], num_labels, multi):
  if given:
    given = list(given)
    for label, name in from_records.items():
      if label < len(given) and given[label] != name:
        raise ValueError(f"--class_names gives {given[label]!r} for label {label}; the records "
                         f"name it {name!r}")
    return given
  if multi:
    raise ValueError("multi-label records carry no class names: give --class_names")
  if not from_records:
    raise ValueError("the records carry no label names: give --class_names")
  n = max(from_records) + 1
  missing = [i for i in range(n) if i not in from_records]
  if missing:
    raise ValueError(f"no record has label(s) {missing}, so their names are unknown: give "
                     "--class_names")
  return [from_records[i] for i in range(n)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Index plain TFRecord files of this project's schema.",
                              epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("data_dir")
  p.add_argument("--name", required=True, help="the dataset's name")
  p.add_argument("--splits", default="",
                 help="split=pattern,... over file names (default: train=*train*,val=*val*,"
                      "test=*test*)")
  p.add_argument("--class_names", default="", help="comma-separated, in label order")
  args = p.parse_args(argv)
  try:
    info = index_folder(args.data_dir, args.name, _parse_splits(args.splits),
                        [c for c in args.class_names.split(",") if c])
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for split, s in info.splits.items():
    print(f"{split}: {s.num_records} records in {len(s.shards)} files")
  report = verify.verify(args.data_dir)
  print(report.summary())
  print(f"wrote: {os.path.join(os.path.abspath(args.data_dir), dataset_info.INFO_FILE)} and an "
        ".index beside each file")
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())

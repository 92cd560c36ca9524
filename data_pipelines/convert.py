r"""Converts an emotion dataset into TFRecord shards with indexes, an info file and a report:
the library of the conversion command (`python -m uniemox_jax.tools.convert`, which hands it
the CLIP text embedder when asked) and of the TFDS builders.

  plan = convert.build_plan("split_tree", "emo8", root="/data/Emo8")
  info, report = convert.convert(plan, "/data/tfrecords/emo8")

Output in `out`:
  <name>-<split>.tfrecord-NNNNN-of-MMMMM    shards of tf.train.Example (schema: records.py)
  <shard>.index                             record offsets, for random access
  <shard>.stats.json                        what the shard holds (used to resume)
  uniemox_info.json                         class names, splits, counts, shards and checksums
  dataset_info.json, features.json          TFDS metadata: the folder is a TFDS dataset too
                                            (tfds.builder_from_directory(out))
  conversion_report.json                    unreadable images, structural problems, duplicates
  split_manifest.json                       (class_folders) the drawn split, for a manifest
  person_boxes_yolov3.json                  (detect_person_boxes) the detected boxes

Rerunning the same conversion skips the shards that are complete; a shard is published by a
rename after it is fully written, so a killed run never leaves a complete-looking partial one.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from data_pipelines import dataset_info
from data_pipelines import hf_datasets
from data_pipelines import images
from data_pipelines import label_tables
from data_pipelines import prompts
from data_pipelines import records
from data_pipelines import sources
from data_pipelines import storage
from data_pipelines import tfrecord

REPORT_FILE = "conversion_report.json"
MANIFEST_FILE = "split_manifest.json"
DETECTIONS_FILE = "person_boxes_yolov3.json"
STATS_SUFFIX = ".stats.json"
# 2: images every reader decodes alike (data_pipelines/images.py); ids without a doubled split.
FORMAT_VERSION = 2
DUPLICATE_POLICIES = ("drop_from_train", "error", "keep")


def shard_name(name: str, split: str, i: int, n: int) -> str:
  return f"{name}-{split}.tfrecord-{i:05d}-of-{n:05d}"


def entry_prompt(plan: sources.Plan, e: sources.Entry) -> str:
  if plan.multi_label:
    emotion = prompts.join_names([c for c, on in zip(plan.class_names, e.labels) if on])
  else:
    emotion = e.label_name
  return prompts.build_prompt(emotion, e.attributes)


def image_id(split: str, rel_path: str) -> str:
  """"<split>/<path relative to the source root>", the split not doubled when the path
  already starts with it (split trees)."""
  return rel_path if rel_path.split(os.sep)[0] == split else f"{split}/{rel_path}"


def source_bytes(e: sources.Entry) -> bytes:
  """The encoded image of an entry: its file, or its cell of a Hugging Face table."""
  if e.row is not None:
    return hf_datasets.read_image(e.path, e.column, e.row)
  with open(e.path, "rb") as f:
    return f.read()


def make_record(e: sources.Entry, prompt: str, text_emb: Optional[np.ndarray] = None,
                max_size: int = 0, exif_orientation: str = "ignore"):
  """(Record, whether a given person box was empty after clipping, why the image was
  re-encoded or "") of one entry: the one place a source image becomes a record, for the CLI
  and the TFDS builders. Raises `images.SkippedFile` (or OSError) on a file that is not
  converted."""
  stored = images.prepare(source_bytes(e), max_size, exif_orientation)
  box = None if e.box_xyxy is None else stored.relative_box(e.box_xyxy)
  rec = records.Record(stored.data, image_id(e.split, e.rel_path), e.rel_path, e.label,
                       e.label_name, prompt, e.attributes, box, e.labels, text_emb)
  return rec, e.box_xyxy is not None and box is None, stored.reencoded


def _complete(path: str, fingerprint: str) -> Optional[Dict[str, Any]]:
  """The stats of a finished, undamaged shard with these contents, or None if it must be
  (re)written. The shard's size and sha256 are checked against its stats: a shard damaged
  since it was written is rewritten, not published again with a stale checksum."""
  stats_path = path + STATS_SUFFIX
  if not (storage.exists(path) and storage.exists(stats_path)):
    return None
  try:
    stats = json.loads(storage.read_text(stats_path))
  except (OSError, ValueError):
    return None
  if not isinstance(stats, dict) or stats.get("fingerprint") != fingerprint:
    return None
  try:
    if storage.is_remote(path):
      # Checked against the bucket's own CRC32C of the object: no download.
      intact = (storage.getsize(path + tfrecord.INDEX_SUFFIX) == 8 * (stats["records"] + 1)
                and storage.getsize(path) == stats["bytes"] and
                storage.remote_crc32c(path) == stats["crc32c"])
    else:
      intact = (len(tfrecord.read_index(path)) - 1 == stats["records"] and
                os.path.getsize(path) == stats["bytes"] and
                tfrecord.file_sha256(path) == stats["sha256"])
  except (OSError, ValueError, KeyError, tfrecord.CorruptRecordError):
    intact = False
  return stats if intact else dict(stats, damaged=True)


def write_shard(task: Dict[str, Any]) -> Dict[str, Any]:
  """Worker: writes one shard, or returns the stats of an identical finished one."""
  path, fingerprint = task["path"], task["fingerprint"]
  done = _complete(path, fingerprint)
  if done is not None and not done.get("damaged"):
    return dict(done, resumed=True)
  stats = {"file": storage.basename(path), "fingerprint": fingerprint, "split": task["split"],
           "class_counts": [0] * task["num_classes"], "bad": [], "bad_boxes": [],
           "reencoded": {}, "with_person": 0, "entries": len(task["entries"])}
  with tfrecord.ShardWriter(path) as writer:
    for k, e in enumerate(task["entries"]):
      emb = None if task["text_emb"] is None else task["text_emb"][k]
      try:
        rec, box_dropped, reencoded = make_record(e, task["prompts"][k], emb,
                                                  task["max_size"], task["exif_orientation"])
      except Exception as err:  # pylint: disable=broad-except
        # Any failure to read: reported with its reason, counted, never silently dropped.
        stats["bad"].append({"path": e.rel_path, "reason": images.reason(err)})
        continue
      if box_dropped:
        stats["bad_boxes"].append(e.rel_path)
      if reencoded:
        stats["reencoded"][reencoded] = stats["reencoded"].get(reencoded, 0) + 1
      writer.write(rec.serialize())
      stats["with_person"] += int(rec.person_box is not None)
      if e.labels is not None:
        stats["class_counts"] = [n + int(on) for n, on in zip(stats["class_counts"], e.labels)]
      else:
        stats["class_counts"][e.label] += 1
    stats.update(writer.commit())
  # Written after the shard: a shard without its stats is simply rewritten on the next run.
  storage.write_text(path + STATS_SUFFIX, json.dumps(stats))
  return dict(stats, rewritten=done is not None)


def _fingerprint(entries: Sequence[sources.Entry], texts: Sequence[str], max_size: int,
                 exif_orientation: str, emb: Optional[np.ndarray]) -> str:
  h = hashlib.sha1(json.dumps([FORMAT_VERSION, max_size, exif_orientation]).encode())
  for e, text in zip(entries, texts):
    h.update(json.dumps([e.split, e.rel_path, e.label, e.labels, e.box_xyxy, e.attributes,
                         text], sort_keys=True, default=str).encode())
  if emb is not None:
    h.update(np.ascontiguousarray(emb, np.float32).tobytes())
  return h.hexdigest()


_OUR_FILES = (dataset_info.INFO_FILE, REPORT_FILE, MANIFEST_FILE, DETECTIONS_FILE, "dataset_info.json",
              "features.json", "raw")


def _shard_files(out: str, name: str) -> List[str]:
  """The files of `name`'s shards in `out` (shards, indexes, stats, temporaries)."""
  return storage.glob(storage.join(storage.escape(out), f"{storage.escape(name)}-*.tfrecord-*"))


def prepare_out_dir(out: str, name: str, overwrite: bool = False) -> None:
  """Refuses, before anything is written, an --out that holds another dataset or files that
  no conversion of `name` wrote; with `overwrite`, removes the folder whole. Then removes a
  killed run's temporary files."""
  if storage.is_remote(out):
    storage.makedirs(out)       # a missing bucket is named before anything else happens
  if overwrite and (storage.exists(out) or os.path.islink(out)):
    if not storage.isdir(out):
      raise NotADirectoryError(f"--out {out} is a file, not a folder")
    storage.rmtree(out)
  if storage.isdir(out):
    info_path = storage.join(out, dataset_info.INFO_FILE)
    if storage.exists(info_path):
      try:
        other = json.loads(storage.read_text(info_path)).get("name")
      except (OSError, ValueError, AttributeError):
        other = "<unreadable info file>"
      if other != name:
        raise ValueError(f"--out {out} holds the dataset {other!r} ({info_path}), not "
                         f"{name!r}: choose another folder, or pass --overwrite to replace it")
    mine = re.compile(re.escape(name) + r"-[^.]+\.tfrecord-")
    foreign = [f for f in storage.listdir(out) if f not in _OUR_FILES
               and not mine.match(f) and not f.endswith(".labels.txt")
               and not re.search(r"\.tmp(-\d+)?$", f)]
    if foreign:
      raise ValueError(f"--out {out} holds files that no conversion of {name!r} wrote "
                       f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): "
                       "choose an empty or new folder, or pass --overwrite to replace it")
    for f in sorted(set(_shard_files(out, name)) |
                    set(storage.glob(storage.join(storage.escape(out), "*.tmp*")))):
      if re.search(r"\.tmp(-\d+)?(\.index)?$", f):
        storage.remove(f)     # a killed run's partial shard, index, stats or metadata


def _sha1_of(e: sources.Entry) -> Optional[str]:
  try:
    if e.row is None:
      return tfrecord.file_sha256(e.path, "sha1")
    return hashlib.sha1(source_bytes(e)).hexdigest()
  except (OSError, ValueError):
    return None        # reported when the shard writer reads it


def find_duplicates(plan: sources.Plan, policy: str = "drop_from_train", workers: int = 1,
                    progress: bool = False) -> Dict[str, Any]:
  """Identical files (by content) across and within splits. `policy`: drop_from_train removes
  from the plan the train entries whose file also appears in val or test; error refuses the
  conversion; keep converts them all. Every case is listed."""
  if policy not in DUPLICATE_POLICIES:
    raise ValueError(f"--duplicates {policy!r}: choose one of {DUPLICATE_POLICIES}")
  # One entry per image (EMOTIC's persons of one image share it), in file order.
  files = {(e.split, e.rel_path.split("#")[0]): e for e in plan.entries}
  keys = sorted(files, key=lambda k: (k[0], files[k].path, files[k].row or 0))
  paths = [files[k] for k in keys]
  bar = _progress(len(paths), progress, "hashing")
  with contextlib.ExitStack() as stack:
    if workers > 1 and len(paths) > 64:
      pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
      hashed = pool.imap(_sha1_of, paths, chunksize=32)
    else:
      hashed = map(_sha1_of, paths)
    digests = []
    for d in hashed:
      digests.append(d)
      bar.update(1)
  bar.close()
  by_digest: Dict[str, Dict[str, List[str]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for (split, rel), digest in zip(keys, digests):
    if digest is not None:
      by_digest[digest][split].append(rel)
  within = [{"split": split, "files": rels} for d in by_digest.values()
            for split, rels in d.items() if len(rels) > 1]
  order = lambda split: (sources.SPLITS + (split,)).index(split)  # noqa: E731
  across = [{split: d[split] for split in sorted(d, key=order)} for d in by_digest.values()
            if len(d) > 1]
  dropped = []
  if across and policy == "error":
    first = "; ".join(" = ".join(image_id(s, r[0]) for s, r in a.items())
                      for a in across[:3])
    raise ValueError(f"{len(across)} image(s) appear in more than one split ({first}"
                     f"{' ...' if len(across) > 3 else ''}); --duplicates=drop_from_train "
                     "removes them from train, --duplicates=keep converts them anyway")
  if policy == "drop_from_train":
    drop = {rel for a in across if "train" in a for rel in a["train"]}
    dropped = sorted(drop)
    plan.entries = [e for e in plan.entries
                    if not (e.split == "train" and e.rel_path.split("#")[0] in drop)]
  return {"across_splits": across, "within_split": within, "dropped_from_train": dropped}


def convert(plan: sources.Plan, out: str, *, shard_size: int = 1024, workers: int = 1,
            max_size: int = 0, text_embedder=None, progress: bool = True,
            tfds_metadata: bool = True, tfds_version: Optional[str] = None,
            exif_orientation: str = "ignore", duplicates: str = "drop_from_train",
            allow_empty_classes: bool = False, overwrite: bool = False):
  """Writes `plan` to `out`; returns (the dataset info, the conversion report), also written to
  dataset_info.INFO_FILE and REPORT_FILE. `text_embedder` (texts -> [N, D] embeddings), when given, stores
  each record's prompt embedding. With `tfds_metadata`, `out` is also a TFDS dataset
  (data_pipelines/tfds_format.py)."""
  if shard_size < 1:
    raise ValueError(f"--shard_size must be positive, got {shard_size}")
  if exif_orientation not in images.EXIF_ORIENTATION_MODES:
    raise ValueError(f"--exif_orientation {exif_orientation!r}: choose one of "
                     f"{images.EXIF_ORIENTATION_MODES}")
  if plan.empty_classes and not allow_empty_classes:
    raise ValueError(f"empty class folder(s): {', '.join(plan.empty_classes)}. A class with "
                     "no images cannot be learned or scored (its F1 is 0); remove the folder, "
                     "or pass --allow_empty_classes to keep it")
  prepare_out_dir(out, plan.name, overwrite)
  dups = find_duplicates(plan, duplicates, workers, progress)
  storage.makedirs(out)
  texts = [entry_prompt(plan, e) for e in plan.entries]
  emb = None
  if text_embedder is not None:
    emb = np.asarray(text_embedder(texts), np.float32)
  tasks = []
  for split in plan.splits():
    idx = [i for i, e in enumerate(plan.entries) if e.split == split]
    n = max(1, -(-len(idx) // shard_size))
    for s in range(n):
      part = idx[s * shard_size:(s + 1) * shard_size]
      entries = [plan.entries[i] for i in part]
      part_texts = [texts[i] for i in part]
      part_emb = None if emb is None else emb[part]
      tasks.append({"path": storage.join(out, shard_name(plan.name, split, s, n)),
                    "split": split, "entries": entries, "prompts": part_texts,
                    "text_emb": part_emb, "max_size": max_size,
                    "exif_orientation": exif_orientation,
                    "num_classes": len(plan.class_names),
                    "fingerprint": _fingerprint(entries, part_texts, max_size,
                                                exif_orientation, part_emb)})
  results = []
  bar = _progress(len(plan.entries), progress)
  if workers <= 1:
    for task in tasks:
      results.append(write_shard(task))
      bar.update(len(task["entries"]))
  else:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      for stats in pool.imap_unordered(write_shard, tasks):
        results.append(stats)
        bar.update(stats["entries"])
  bar.close()
  results.sort(key=lambda r: r["file"])
  removed = _remove_stale_shards(out, plan.name, {t["path"] for t in tasks})
  info = _info(plan, results, None if emb is None else emb.shape[1])
  report = _report(plan, results, dups, removed)
  info.save(out)
  _write_json(storage.join(out, REPORT_FILE), report)
  if plan.manifest is not None:
    _write_json(storage.join(out, MANIFEST_FILE), plan.manifest)
  if tfds_metadata:
    from data_pipelines import tfds_format  # pylint: disable=g-import-not-at-top
    tfds_format.write_metadata(out, info, version=tfds_version)
  return info, report


def _remove_stale_shards(out: str, name: str, current: set) -> List[str]:
  """Removes shards of `name` (with their indexes and stats) that this conversion did not
  write: a previous run's, with another shard count or split."""
  removed = []
  for f in _shard_files(out, name):
    shard = f
    for suffix in (tfrecord.INDEX_SUFFIX, STATS_SUFFIX):
      if shard.endswith(suffix):
        shard = shard[:-len(suffix)]
    if shard not in current:
      storage.remove(f)
      removed.append(storage.basename(f))
  return removed


def _progress(total: int, enabled: bool, desc: str = "converting"):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit="img", desc=desc, disable=not enabled, file=sys.stderr)


def _write_json(path: str, data: Any) -> None:
  storage.write_text(path, json.dumps(data, indent=1))


def _info(plan: sources.Plan, results: List[Dict[str, Any]],
          emb_dim: Optional[int]) -> dataset_info.DatasetInfo:
  splits = {}
  for r in results:
    s = splits.setdefault(r["split"], {"num_records": 0, "with_person": 0,
                                       "class_counts": [0] * len(plan.class_names),
                                       "shards": []})
    s["num_records"] += r["records"]
    s["with_person"] += r["with_person"]
    s["class_counts"] = [a + b for a, b in zip(s["class_counts"], r["class_counts"])]
    s["shards"].append({k: r[k] for k in ("file", "records", "bytes", "sha256")})
  features = list(records.FEATURES) + (["labels"] if plan.multi_label else []) + (
      ["text_emb"] if emb_dim else [])
  return dataset_info.DatasetInfo.from_json({
      "format_version": FORMAT_VERSION, "name": plan.name, "class_names": plan.class_names,
      "multi_label": plan.multi_label, "features": features, "text_emb_dim": emb_dim,
      "splits": splits})


def _report(plan: sources.Plan, results: List[Dict[str, Any]], dups: Dict[str, Any],
            removed: List[str]):
  unreadable = [dict(b, split=r["split"]) for r in results for b in r["bad"]]
  reencoded: Dict[str, int] = collections.Counter()
  for r in results:
    reencoded.update(r.get("reencoded", {}))
  return {
      "source_layout": plan.layout,
      "skipped_files": plan.skipped + unreadable,
      "num_skipped": len(plan.skipped) + len(unreadable),
      "num_unreadable": len(unreadable),
      "system_files_ignored": plan.system_files,
      "structure_problems": plan.problems,
      "empty_classes": plan.empty_classes,
      "duplicates_across_splits": dups["across_splits"],
      "duplicates_dropped_from_train": dups["dropped_from_train"],
      "duplicates_within_split": dups["within_split"],
      "empty_person_boxes": [p for r in results for p in r["bad_boxes"]],
      "reencoded_images": dict(reencoded),
      "written": {s: sum(r["records"] for r in results if r["split"] == s)
                  for s in plan.splits()},
      "resumed_shards": sum(1 for r in results if r.get("resumed")),
      "rewritten_damaged_shards": [r["file"] for r in results if r.get("rewritten")],
      "removed_stale_files": removed,
  }


def read_side_file(path: Optional[str], flag: str):
  """The JSON {relative image path: value} of a side file (person boxes, attributes), or
  None without a path; `flag` names it in the messages."""
  if not path:
    return None
  data = storage.read_json(path, flag)
  if not isinstance(data, dict):
    raise ValueError(f"{flag} {path} must map relative image paths to values")
  return data


SOURCES = ("split_tree", "class_folders", "emoset", "emotic", "hf", "table")


def build_plan(source: str, name: str, root: str, splits: Sequence[str] = sources.SPLITS, *,
               recipe: str = "", split_fractions: Sequence[float] = (), seed: int = 0,
               manifest: Optional[Dict[str, Any]] = None, image_column: str = "image",
               label_column: str = "label", hf_config: str = "", labels: str = "",
               split_column: str = "") -> sources.Plan:
  """What a source folder holds, as the converter will write it (`sources`): "split_tree",
  "class_folders" (split by `recipe` or `split_fractions`, or as a saved `manifest`),
  "emoset", "emotic", "hf" (a Hugging Face dataset folder, `hf_datasets`, with its image
  and label columns and, for a hub card with several, its config) or "table" (images listed
  in the table `labels`, `label_tables`, split by its `split_column` or as class_folders)."""
  if source == "table":
    if not labels:
      raise ValueError("--labels (a .csv, .tsv, .json or .jsonl table) is required for "
                       "--source table")
    return label_tables.plan(labels, name, root, image_column, label_column, split_column,
                             splits, recipe, split_fractions, seed, manifest)
  if not root:
    raise ValueError(f"--root is required for --source {source}")
  if source == "split_tree":
    return sources.split_tree(root, name, splits)
  if source == "class_folders":
    return sources.class_folders(root, name, recipe, split_fractions, seed, manifest)
  if source == "emoset":
    return sources.emoset(root, name, splits)
  if source == "emotic":
    return sources.emotic(root, name, splits)
  if source == "hf":
    return hf_datasets.plan(root, name, splits, image_column, label_column, hf_config)
  raise ValueError(f"--source {source!r} is unknown; choose one of {SOURCES}")


def detect_person_boxes(plan: sources.Plan, out: str, detector, settings: Dict[str, Any]
                        ) -> Dict[str, Any]:
  """The top person box of every image of `plan` without one, from `detector` ({relative
  path: file} -> {relative path: box or None}, e.g. `yolov3.Detector`). Kept in `out` as
  DETECTIONS_FILE with the `settings` that made them, and reused by a rerun with the same
  settings."""
  todo = {e.rel_path.split("#")[0]: e.path if e.row is None else
          functools.partial(source_bytes, e) for e in plan.entries if e.box_xyxy is None}
  cache = storage.join(out, DETECTIONS_FILE)
  saved = storage.read_json(cache, missing={})
  if saved.get("settings") == settings and set(todo) <= set(saved.get("boxes", {})):
    print(f"YOLOv3: reusing {cache}")
    return saved["boxes"]
  boxes = detector(todo)
  found = sum(b is not None for b in boxes.values())
  print(f"YOLOv3: a person in {found} of {len(boxes)} images, none in {len(boxes) - found} "
        f"(rule {settings['rule']}, confidence {settings['conf']}, NMS IoU "
        f"{settings['nms_iou']})")
  storage.makedirs(out)
  _write_json(cache, {"settings": settings, "with_person": found,
                      "without_person": len(boxes) - found, "boxes": boxes})
  return boxes


def summary(info: dataset_info.DatasetInfo, report: Dict[str, Any], report_path: str,
            max_listed: int = 20) -> str:
  """The closing summary: what was written, and every file that was not, with its reason."""
  lines = [f"read: {report['source_layout']}"] if report.get("source_layout") else []
  lines += [f"{split}: {s.num_records} records in {len(s.shards)} shards, "
            f"{s.with_person} with a person box" for split, s in info.splits.items()]
  skipped = report["skipped_files"]
  if skipped:
    lines.append(f"skipped {len(skipped)} file(s):")
    lines += [f"  {f['path']}: {f['reason']}" for f in skipped[:max_listed]]
    if len(skipped) > max_listed:
      lines.append(f"  ... and {len(skipped) - max_listed} more in {report_path}")
  if report["system_files_ignored"]:
    lines.append(f"ignored {report['system_files_ignored']} system file(s) (.DS_Store, "
                 "Thumbs.db, ...)")
  for what, n in report["reencoded_images"].items():
    lines.append(f"re-encoded {n} image(s): {what}")
  if report["duplicates_dropped_from_train"]:
    lines.append(f"dropped {len(report['duplicates_dropped_from_train'])} train image(s) "
                 "that also appear in val or test (--duplicates=drop_from_train)")
  elif report["duplicates_across_splits"]:
    lines.append(f"{len(report['duplicates_across_splits'])} image(s) appear in more than one "
                 "split (kept: --duplicates=keep)")
  if report["duplicates_within_split"]:
    lines.append(f"{len(report['duplicates_within_split'])} group(s) of identical images "
                 "within a split (kept)")
  if report["structure_problems"]:
    lines.append(f"{len(report['structure_problems'])} structural problem(s):")
    lines += [f"  {p}" for p in report["structure_problems"][:max_listed]]
  if report["rewritten_damaged_shards"]:
    lines.append("rewrote damaged shard(s): " + ", ".join(report["rewritten_damaged_shards"]))
  lines.append(f"report: {report_path}")
  return "\n".join(lines)

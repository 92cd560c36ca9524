r"""Converts an emotion dataset into TFRecord shards with indexes, an info file and a report.

  python -m data_pipelines.convert --source split_tree --root /data/Emo8 --name emo8 \
      --out /data/tfrecords/emo8
  python -m data_pipelines.convert --source class_folders --recipe fi --seed 0 \
      --root /data/FI_raw --name fi --out /data/tfrecords/fi
  python -m data_pipelines.convert --source emoset --root /data/EmoSet-118K --name emoset \
      --out /data/tfrecords/emoset --text_embeddings openai/clip-vit-base-patch16
  python -m data_pipelines.convert --source synthetic --name synthetic --out /tmp/synth

Output in --out:
  <name>-<split>.tfrecord-NNNNN-of-MMMMM    shards of tf.train.Example (schema: records.py)
  <shard>.index                             record offsets, for random access
  <shard>.stats.json                        what the shard holds (used to resume)
  uniemox_info.json                         class names, splits, counts, shards and checksums
  dataset_info.json, features.json          TFDS metadata: the folder is a TFDS dataset too
                                            (tfds.builder_from_directory(--out))
  conversion_report.json                    unreadable images, structural problems, duplicates
  split_manifest.json                       (class_folders) the drawn split, for --manifest
  person_boxes_yolov3.json                  (--person_boxes yolov3:...) the detected boxes

Rerunning the same command skips the shards that are complete; a shard is published by a
rename after it is fully written, so a killed run never leaves a complete-looking partial one.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from data_pipelines import images
from data_pipelines import records
from data_pipelines import sources
from data_pipelines import tfrecord
from data_pipelines import verify
from uniemox_jax import storage
from uniemox_jax.teacher import prompts

INFO_FILE = records.INFO_FILE
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


def make_record(e: sources.Entry, prompt: str, text_emb: Optional[np.ndarray] = None,
                max_size: int = 0, exif_orientation: str = "ignore"):
  """(Record, whether a given person box was empty after clipping, why the image was
  re-encoded or "") of one entry: the one place a source image becomes a record, for the CLI
  and the TFDS builders. Raises `images.SkippedFile` (or OSError) on a file that is not
  converted."""
  with open(e.path, "rb") as f:
    stored = images.prepare(f.read(), max_size, exif_orientation)
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


_OUR_FILES = (INFO_FILE, REPORT_FILE, MANIFEST_FILE, DETECTIONS_FILE, "dataset_info.json",
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
    info_path = storage.join(out, INFO_FILE)
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


def _sha1_of(path: str) -> Optional[str]:
  try:
    return tfrecord.file_sha256(path, "sha1")
  except OSError:
    return None        # reported when the shard writer reads it


def find_duplicates(plan: sources.Plan, policy: str = "drop_from_train", workers: int = 1,
                    progress: bool = False) -> Dict[str, Any]:
  """Identical files (by content) across and within splits. `policy`: drop_from_train removes
  from the plan the train entries whose file also appears in val or test; error refuses the
  conversion; keep converts them all. Every case is listed."""
  if policy not in DUPLICATE_POLICIES:
    raise ValueError(f"--duplicates {policy!r}: choose one of {DUPLICATE_POLICIES}")
  files = sorted({(e.split, e.rel_path.split("#")[0], e.path) for e in plan.entries})
  paths = [f[2] for f in files]
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
  for (split, rel, _), digest in zip(files, digests):
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
            allow_empty_classes: bool = False, overwrite: bool = False) -> Dict[str, Any]:
  """Writes `plan` to `out`; returns the dataset info (also written to INFO_FILE). With
  `tfds_metadata`, `out` is also a TFDS dataset (data_pipelines/tfds_format.py)."""
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
  _write_json(storage.join(out, INFO_FILE), info)
  _write_json(storage.join(out, REPORT_FILE), report)
  if plan.manifest is not None:
    _write_json(storage.join(out, MANIFEST_FILE), plan.manifest)
  if tfds_metadata:
    from data_pipelines import tfds_format  # pylint: disable=g-import-not-at-top
    tfds_format.write_metadata(out, info, version=tfds_version)
  return info


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


def _info(plan: sources.Plan, results: List[Dict[str, Any]], emb_dim: Optional[int]):
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
  return {"format_version": FORMAT_VERSION, "name": plan.name, "class_names": plan.class_names,
          "multi_label": plan.multi_label, "features": features, "text_emb_dim": emb_dim,
          "splits": splits}


def _report(plan: sources.Plan, results: List[Dict[str, Any]], dups: Dict[str, Any],
            removed: List[str]):
  unreadable = [dict(b, split=r["split"]) for r in results for b in r["bad"]]
  reencoded: Dict[str, int] = collections.Counter()
  for r in results:
    reencoded.update(r.get("reencoded", {}))
  return {
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


def _read_side_file(path: Optional[str], flag: str):
  if not path:
    return None
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{flag} {path} does not exist") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{flag} {path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{flag} {path} must map relative image paths to values")
  return data


def build_plan(args) -> sources.Plan:
  splits = args.splits.split(",") if args.splits else list(sources.SPLITS)
  if args.source == "synthetic":
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    # Beside the shards when --out is local; in the local cache when it is a bucket.
    root = args.root or (os.path.join(storage.cache_dir(), "synthetic", args.name)
                         if storage.is_remote(args.out) else os.path.join(args.out, "raw"))
    if not os.path.exists(os.path.join(root, "boxes.json")):
      synthetic.generate(root, [int(x) for x in args.per_class.split(",")], args.image_size,
                         args.seed)
    args.person_boxes = args.person_boxes or os.path.join(root, "boxes.json")
    args.attributes = args.attributes or os.path.join(root, "attributes.json")
    plan = sources.split_tree(root, args.name, splits)
  elif args.source == "split_tree":
    plan = sources.split_tree(_need(args.root, "--root"), args.name, splits)
  elif args.source == "class_folders":
    manifest = _read_side_file(args.manifest, "--manifest")
    fractions = [float(x) for x in args.split_fractions.split(",")] if \
        args.split_fractions else ()
    plan = sources.class_folders(_need(args.root, "--root"), args.name, args.recipe,
                                 fractions, args.seed, manifest)
  elif args.source == "emoset":
    plan = sources.emoset(_need(args.root, "--root"), args.name, splits)
  elif args.source == "emotic":
    plan = sources.emotic(_need(args.root, "--root"), args.name, splits)
  else:
    raise ValueError(f"--source {args.source!r} is unknown")
  if args.person_boxes and args.person_boxes.startswith("yolov3:"):
    boxes = detect_person_boxes(plan, args)
  else:
    boxes = _read_side_file(args.person_boxes, "--person_boxes")
  sources.apply_side_files(plan, boxes, _read_side_file(args.attributes, "--attributes"))
  return plan


def detect_person_boxes(plan: sources.Plan, args) -> Dict[str, Any]:
  """--person_boxes yolov3:CFG,WEIGHTS: the top person box of every image without one, by
  YOLOv3 (data_pipelines/yolov3.py). Kept in --out as DETECTIONS_FILE with the settings that
  made it, and reused by a rerun with the same settings."""
  from data_pipelines import yolov3  # pylint: disable=g-import-not-at-top
  cfg_path, weights_path = yolov3.parse_spec(args.person_boxes)
  settings = {"cfg": os.path.abspath(cfg_path), "weights": os.path.abspath(weights_path),
              "weights_bytes": os.path.getsize(weights_path), "conf": args.yolo_conf,
              "rule": args.yolo_rule,
              "nms_iou": args.yolo_nms_iou, "size": args.yolo_size}
  todo = {e.rel_path.split("#")[0]: e.path for e in plan.entries if e.box_xyxy is None}
  cache = storage.join(args.out, DETECTIONS_FILE)
  if storage.exists(cache):
    saved = json.loads(storage.read_text(cache))
    if saved.get("settings") == settings and set(todo) <= set(saved.get("boxes", {})):
      print(f"YOLOv3: reusing {cache}")
      return saved["boxes"]
  boxes = yolov3.detect_files(todo, cfg_path, weights_path, args.yolo_conf, args.yolo_nms_iou,
                              args.yolo_batch, progress=not args.no_progress,
                              size=args.yolo_size or None, rule=args.yolo_rule)
  found = sum(b is not None for b in boxes.values())
  print(f"YOLOv3: a person in {found} of {len(boxes)} images, none in {len(boxes) - found} "
        f"(rule {args.yolo_rule}, confidence {args.yolo_conf}, NMS IoU {args.yolo_nms_iou})")
  storage.makedirs(args.out)
  _write_json(cache, {"settings": settings, "with_person": found,
                      "without_person": len(boxes) - found, "boxes": boxes})
  return boxes


def _need(value, flag):
  if not value:
    raise ValueError(f"{flag} is required for this --source")
  return value


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Convert an emotion dataset to TFRecord shards.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--source", required=True,
                 choices=["split_tree", "class_folders", "emoset", "emotic", "synthetic"])
  p.add_argument("--root", help="the dataset's root folder")
  p.add_argument("--out", required=True, help="output folder for shards and metadata")
  p.add_argument("--name", required=True, help="dataset name used in shard file names")
  p.add_argument("--splits", default="", help="comma-separated splits (default: all)")
  p.add_argument("--shard_size", type=int, default=1024, help="records per shard")
  p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
  p.add_argument("--max_size", type=int, default=0,
                 help="re-encode images whose shorter side exceeds this (0: keep originals)")
  p.add_argument("--person_boxes",
                 help="JSON {relative path: [x1, y1, x2, y2] or null}, or yolov3:CFG,WEIGHTS "
                      "to detect them (Darknet yolov3.cfg / yolov3.weights)")
  p.add_argument("--yolo_conf", type=float, default=0.8,
                 help="YOLOv3: the confidence threshold of --yolo_rule")
  p.add_argument("--yolo_rule", default="reference", choices=["reference", "product"],
                 help="YOLOv3: reference keeps objectness >= conf with person the top class "
                      "(the reference implementation); product keeps objectness x P(person) "
                      ">= conf")
  p.add_argument("--yolo_nms_iou", type=float, default=0.4, help="YOLOv3: NMS IoU threshold")
  p.add_argument("--yolo_batch", type=int, default=16, help="YOLOv3: images per batch")
  p.add_argument("--yolo_size", type=int, default=416,
                 help="YOLOv3: letterboxed input side (0: the cfg's [net] width)")
  p.add_argument("--attributes", help="JSON {relative path: {scene, objects, ...}}")
  p.add_argument("--recipe", default="", help="class_folders split recipe: "
                 + ", ".join(sorted(sources.RECIPES) + ["caer_s"]))
  p.add_argument("--split_fractions", default="", help="class_folders: train,val,test")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--manifest", help="class_folders: reuse this split_manifest.json")
  p.add_argument("--text_embeddings", default="",
                 help="CLIP hub id or directory: store each prompt's text embedding")
  p.add_argument("--per_class", default="40,8,8", help="synthetic: train,val,test per class")
  p.add_argument("--image_size", type=int, default=64, help="synthetic: image side")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--tfds_version", default=None,
                 help="the TFDS version to record (default: --out's name if it is one, as in "
                      "<data_dir>/<name>/1.0.0, else 1.0.0)")
  p.add_argument("--exif_orientation", default="ignore", choices=images.EXIF_ORIENTATION_MODES,
                 help="ignore: store pixels as encoded (the reference, TensorFlow); apply: "
                      "rotate photos as their EXIF tag says")
  p.add_argument("--duplicates", default="drop_from_train", choices=DUPLICATE_POLICIES,
                 help="identical images in two splits: drop the train copy, refuse, or keep")
  p.add_argument("--allow_empty_classes", action="store_true",
                 help="convert although a class folder holds no image")
  p.add_argument("--strict", action="store_true",
                 help="exit 2 when any file was skipped (unreadable, not an image). The folder "
                      "is still written, complete and verified without those files (the "
                      "report lists them): fix or remove them and rerun (finished shards are "
                      "kept), or use the folder as it is")
  p.add_argument("--overwrite", action="store_true",
                 help="remove --out first (it may hold another dataset)")
  p.add_argument("--no_tfds_metadata", action="store_true",
                 help="skip dataset_info.json / features.json (TFDS is then not imported)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  prepare_out_dir(args.out, args.name, args.overwrite)    # before anything is written
  plan = build_plan(args)
  embedder = None
  if args.text_embeddings:
    from uniemox_jax.teacher import clip  # pylint: disable=g-import-not-at-top
    teacher = clip.ClipTeacher.load(args.text_embeddings)
    embedder = teacher.embed_texts
  info = convert(plan, args.out, shard_size=args.shard_size, workers=args.workers,
                 max_size=args.max_size, text_embedder=embedder,
                 progress=not args.no_progress, tfds_metadata=not args.no_tfds_metadata,
                 tfds_version=args.tfds_version, exif_orientation=args.exif_orientation,
                 duplicates=args.duplicates, allow_empty_classes=args.allow_empty_classes)
  report = json.loads(storage.read_text(storage.join(args.out, REPORT_FILE)))
  print(summary(info, report, storage.join(args.out, REPORT_FILE)))
  check = verify.verify(args.out)
  print(check.summary())
  shards = sum(len(s["shards"]) for s in info["splits"].values())
  print(f"wrote: {storage.absolute(args.out)} ({shards} shards with indexes, {INFO_FILE}, "
        f"{REPORT_FILE}" + ("" if args.no_tfds_metadata else ", dataset_info.json, "
                            "features.json") + ")")
  if not check.ok:
    return 1
  if args.strict and report["num_skipped"]:
    print(f"error: --strict: {report['num_skipped']} file(s) were not converted (listed "
          f"above and in {storage.join(args.out, REPORT_FILE)}); the folder holds the rest",
          file=sys.stderr)
    return 2
  return 0


def summary(info: Dict[str, Any], report: Dict[str, Any], report_path: str,
            max_listed: int = 20) -> str:
  """The closing summary: what was written, and every file that was not, with its reason."""
  lines = [f"{split}: {s['num_records']} records in {len(s['shards'])} shards, "
           f"{s['with_person']} with a person box" for split, s in info["splits"].items()]
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


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, OSError) as e:     # a user's input: one line, exit 2
    if os.environ.get("UNIEMOX_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

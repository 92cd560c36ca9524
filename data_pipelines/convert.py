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
import hashlib
import io
import json
import multiprocessing
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from data_pipelines import records
from data_pipelines import sources
from data_pipelines import tfrecord
from uniemox_jax.teacher import prompts

INFO_FILE = records.INFO_FILE
REPORT_FILE = "conversion_report.json"
MANIFEST_FILE = "split_manifest.json"
DETECTIONS_FILE = "person_boxes_yolov3.json"
STATS_SUFFIX = ".stats.json"
FORMAT_VERSION = 1


def shard_name(name: str, split: str, i: int, n: int) -> str:
  return f"{name}-{split}.tfrecord-{i:05d}-of-{n:05d}"


def entry_prompt(plan: sources.Plan, e: sources.Entry) -> str:
  if plan.multi_label:
    emotion = prompts.join_names([c for c, on in zip(plan.class_names, e.labels) if on])
  else:
    emotion = e.label_name
  return prompts.build_prompt(emotion, e.attributes)


def _encode_image(path: str, max_size: int):
  """(bytes to store, original width, original height, content hash); raises on a file that
  does not decode completely."""
  with open(path, "rb") as f:
    data = f.read()
  digest = hashlib.sha1(data).hexdigest()
  with Image.open(io.BytesIO(data)) as img:
    img.load()    # decodes fully: a truncated or corrupt file fails here, not in training
    width, height = img.size
    if max_size and min(width, height) > max_size:
      scale = max_size / min(width, height)
      size = (max(1, round(width * scale)), max(1, round(height * scale)))
      out = io.BytesIO()
      img.convert("RGB").resize(size, Image.BICUBIC).save(out, "JPEG", quality=95)
      data = out.getvalue()
  return data, width, height, digest


def _relative_box(box, width, height):
  """Pixel [x1, y1, x2, y2] -> relative [ymin, xmin, ymax, xmax], clipped; None if empty."""
  x1, y1, x2, y2 = box
  rel = np.clip([y1 / height, x1 / width, y2 / height, x2 / width], 0.0, 1.0)
  if rel[2] <= rel[0] or rel[3] <= rel[1]:
    return None
  return [float(v) for v in rel]


def make_record(e: sources.Entry, prompt: str, text_emb: Optional[np.ndarray] = None,
                max_size: int = 0):
  """(Record, content hash, whether a given person box was empty after clipping) of one
  entry: the one place a source image becomes a record, for the CLI and the TFDS builders.
  Raises on an image that does not decode completely."""
  data, width, height, digest = _encode_image(e.path, max_size)
  box = None if e.box_xyxy is None else _relative_box(e.box_xyxy, width, height)
  rec = records.Record(data, f"{e.split}/{e.rel_path}", e.rel_path, e.label, e.label_name,
                       prompt, e.attributes, box, e.labels, text_emb)
  return rec, digest, e.box_xyxy is not None and box is None


def _complete(path: str, fingerprint: str) -> Optional[Dict[str, Any]]:
  """The stats of a finished shard with these contents, or None if it must be (re)written."""
  stats_path = path + STATS_SUFFIX
  if not (os.path.exists(path) and os.path.exists(stats_path)):
    return None
  try:
    with open(stats_path) as f:
      stats = json.load(f)
    if stats.get("fingerprint") != fingerprint:
      return None
    if len(tfrecord.read_index(path)) - 1 != stats["records"]:
      return None
  except (OSError, ValueError, KeyError, tfrecord.CorruptRecordError):
    return None
  return stats


def write_shard(task: Dict[str, Any]) -> Dict[str, Any]:
  """Worker: writes one shard, or returns the stats of an identical finished one."""
  path, fingerprint = task["path"], task["fingerprint"]
  done = _complete(path, fingerprint)
  if done is not None:
    return dict(done, resumed=True)
  stats = {"file": os.path.basename(path), "fingerprint": fingerprint, "split": task["split"],
           "class_counts": [0] * task["num_classes"], "bad": [], "bad_boxes": [],
           "hashes": {}, "with_person": 0}
  with tfrecord.ShardWriter(path) as writer:
    for k, e in enumerate(task["entries"]):
      emb = None if task["text_emb"] is None else task["text_emb"][k]
      try:
        rec, digest, box_dropped = make_record(e, task["prompts"][k], emb, task["max_size"])
      except Exception as err:  # pylint: disable=broad-except
        # Any decoding failure: reported, counted, never silently dropped.
        stats["bad"].append({"path": e.rel_path, "error": f"{type(err).__name__}: {err}"})
        continue
      box = rec.person_box
      if box_dropped:
        stats["bad_boxes"].append(e.rel_path)
      writer.write(rec.serialize())
      stats["hashes"][digest] = e.rel_path
      stats["with_person"] += int(box is not None)
      if e.labels is not None:
        stats["class_counts"] = [n + int(on) for n, on in zip(stats["class_counts"], e.labels)]
      else:
        stats["class_counts"][e.label] += 1
    stats.update(writer.commit())
  # Written after the shard: a shard without its stats is simply rewritten on the next run.
  tmp = f"{path}{STATS_SUFFIX}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(stats, f)
  os.replace(tmp, path + STATS_SUFFIX)
  return stats


def _fingerprint(entries: Sequence[sources.Entry], texts: Sequence[str], max_size: int,
                 emb: Optional[np.ndarray]) -> str:
  h = hashlib.sha1(json.dumps([FORMAT_VERSION, max_size]).encode())
  for e, text in zip(entries, texts):
    h.update(json.dumps([e.split, e.rel_path, e.label, e.labels, e.box_xyxy, e.attributes,
                         text], sort_keys=True, default=str).encode())
  if emb is not None:
    h.update(np.ascontiguousarray(emb, np.float32).tobytes())
  return h.hexdigest()


def convert(plan: sources.Plan, out: str, *, shard_size: int = 1024, workers: int = 1,
            max_size: int = 0, text_embedder=None, progress: bool = True,
            tfds_metadata: bool = True, tfds_version: Optional[str] = None) -> Dict[str, Any]:
  """Writes `plan` to `out`; returns the dataset info (also written to INFO_FILE). With
  `tfds_metadata`, `out` is also a TFDS dataset (data_pipelines/tfds_format.py)."""
  if shard_size < 1:
    raise ValueError(f"--shard_size must be positive, got {shard_size}")
  os.makedirs(out, exist_ok=True)
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
      tasks.append({"path": os.path.join(out, shard_name(plan.name, split, s, n)),
                    "split": split, "entries": entries, "prompts": part_texts,
                    "text_emb": part_emb, "max_size": max_size,
                    "num_classes": len(plan.class_names),
                    "fingerprint": _fingerprint(entries, part_texts, max_size, part_emb)})
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
        bar.update(len(stats["hashes"]) + len(stats["bad"]))
  bar.close()
  results.sort(key=lambda r: r["file"])
  info = _info(plan, results, None if emb is None else emb.shape[1])
  report = _report(plan, results)
  _write_json(os.path.join(out, INFO_FILE), info)
  _write_json(os.path.join(out, REPORT_FILE), report)
  if plan.manifest is not None:
    _write_json(os.path.join(out, MANIFEST_FILE), plan.manifest)
  if tfds_metadata:
    from data_pipelines import tfds_format  # pylint: disable=g-import-not-at-top
    tfds_format.write_metadata(out, info, version=tfds_version)
  return info


def _progress(total: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit="img", desc="converting", disable=not enabled,
              file=sys.stderr)


def _write_json(path: str, data: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


FEATURES = ("image", "image_id", "source_path", "label", "label_name", "prompt", "attributes",
            "person_box", "has_person")


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
  features = list(FEATURES) + (["labels"] if plan.multi_label else []) + (
      ["text_emb"] if emb_dim else [])
  return {"format_version": FORMAT_VERSION, "name": plan.name, "class_names": plan.class_names,
          "multi_label": plan.multi_label, "features": features, "text_emb_dim": emb_dim,
          "splits": splits}


def _report(plan: sources.Plan, results: List[Dict[str, Any]]):
  seen: Dict[str, Dict[str, str]] = collections.defaultdict(dict)
  within = []
  for r in results:
    for digest, rel in r["hashes"].items():
      if r["split"] in seen[digest]:
        within.append([seen[digest][r["split"]], rel])
      seen[digest].setdefault(r["split"], rel)
  across = [{"splits": paths} for paths in seen.values() if len(paths) > 1]
  bad = [dict(b, split=r["split"]) for r in results for b in r["bad"]]
  return {
      "unreadable_images": bad,
      "num_unreadable": len(bad),
      "structure_problems": plan.problems,
      "duplicates_across_splits": across,
      "duplicates_within_split": within,
      "empty_person_boxes": [p for r in results for p in r["bad_boxes"]],
      "written": {s: sum(r["records"] for r in results if r["split"] == s)
                  for s in plan.splits()},
      "resumed_shards": sum(1 for r in results if r.get("resumed")),
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
    root = args.root or os.path.join(args.out, "raw")
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
              "nms_iou": args.yolo_nms_iou, "size": args.yolo_size}
  todo = {e.rel_path.split("#")[0]: e.path for e in plan.entries if e.box_xyxy is None}
  cache = os.path.join(args.out, DETECTIONS_FILE)
  if os.path.exists(cache):
    with open(cache) as f:
      saved = json.load(f)
    if saved.get("settings") == settings and set(todo) <= set(saved.get("boxes", {})):
      print(f"YOLOv3: reusing {cache}")
      return saved["boxes"]
  boxes = yolov3.detect_files(todo, cfg_path, weights_path, args.yolo_conf, args.yolo_nms_iou,
                              args.yolo_batch, progress=not args.no_progress,
                              size=args.yolo_size or None)
  found = sum(b is not None for b in boxes.values())
  print(f"YOLOv3: a person in {found} of {len(boxes)} images, none in {len(boxes) - found} "
        f"(confidence {args.yolo_conf}, NMS IoU {args.yolo_nms_iou})")
  os.makedirs(args.out, exist_ok=True)
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
                 help="YOLOv3: person confidence (objectness x class probability)")
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
  p.add_argument("--no_tfds_metadata", action="store_true",
                 help="skip dataset_info.json / features.json (TFDS is then not imported)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  plan = build_plan(args)
  embedder = None
  if args.text_embeddings:
    from uniemox_jax.teacher import clip  # pylint: disable=g-import-not-at-top
    teacher = clip.ClipTeacher.load(args.text_embeddings)
    embedder = teacher.embed_texts
  info = convert(plan, args.out, shard_size=args.shard_size, workers=args.workers,
                 max_size=args.max_size, text_embedder=embedder,
                 progress=not args.no_progress, tfds_metadata=not args.no_tfds_metadata,
                 tfds_version=args.tfds_version)
  with open(os.path.join(args.out, REPORT_FILE)) as f:
    report = json.load(f)
  for split, s in info["splits"].items():
    print(f"{split}: {s['num_records']} records in {len(s['shards'])} shards, "
          f"{s['with_person']} with a person box")
  problems = (report["num_unreadable"], len(report["structure_problems"]),
              len(report["duplicates_across_splits"]))
  if any(problems):
    print(f"WARNING: {problems[0]} unreadable images, {problems[1]} structural problems, "
          f"{problems[2]} images in more than one split: see "
          f"{os.path.join(args.out, REPORT_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

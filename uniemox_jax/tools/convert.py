r"""Converts an emotion dataset into TFRecord shards with indexes, an info file and a report
(the library: data_pipelines/convert.py), then verifies what it wrote.

  python -m uniemox_jax.tools.convert --source split_tree --root /data/Emo8 --name emo8 \
      --out /data/tfrecords/emo8
  python -m uniemox_jax.tools.convert --source class_folders --recipe fi --seed 0 \
      --root /data/FI_raw --name fi --out /data/tfrecords/fi
  python -m uniemox_jax.tools.convert --source emoset --root /data/EmoSet-118K --name emoset \
      --out /data/tfrecords/emoset --text_embeddings openai/clip-vit-base-patch16
  python -m uniemox_jax.tools.convert --source hf --root /data/EmoSet-118K-hub --name emoset \
      --out /data/tfrecords/emoset_hub          # a hub download or save_to_disk folder
  python -m uniemox_jax.tools.convert --source table --labels /data/mine/labels.csv \
      --image_column path --label_column emotion --split_column split --name mine \
      --out /data/tfrecords/mine                # images listed in a CSV / JSON(L) table
  python -m uniemox_jax.tools.convert --source synthetic --name synthetic --out /tmp/synth

A command, not part of the data library: it hands the converter the CLIP text embedder
(--text_embeddings, the teacher's text tower) and the YOLOv3 person detector (--person_boxes
yolov3:...). What the output folder holds: data_pipelines/convert.py. Rerunning the same
command resumes: finished shards are kept after their checksum is checked again.

Exit codes: 0 written and verified; 1 the written folder failed its verification; 2 a problem
with the input (one line naming it), or --strict with files that were not converted.
"""
from __future__ import annotations

import argparse
import os
import sys

from data_pipelines import convert
from data_pipelines import dataset_info
from data_pipelines import images
from data_pipelines import sources
from data_pipelines import storage
from data_pipelines import synthetic
from data_pipelines import verify
from uniemox_jax import errors


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Convert an emotion dataset to TFRecord shards.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--source", required=True, choices=list(convert.SOURCES) + ["synthetic"])
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
  p.add_argument("--recipe", default="", help="class_folders, table: split recipe: "
                 + ", ".join(sorted(sources.RECIPES) + ["caer_s"]))
  p.add_argument("--split_fractions", default="",
                 help="class_folders, table: train,val,test")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--manifest", help="class_folders, table: reuse this split_manifest.json")
  p.add_argument("--labels", default="",
                 help="table: the .csv, .tsv, .json or .jsonl of image paths and labels "
                      "(--root, where the paths start, defaults to its folder)")
  p.add_argument("--image_column", default="image",
                 help="hf, table: the column holding the images (hf: {bytes, path}, bytes or "
                      "a path; table: paths)")
  p.add_argument("--label_column", default="label",
                 help="hf, table: the column holding the labels (a ClassLabel, class names "
                      "or class indexes)")
  p.add_argument("--split_column", default="",
                 help="table: the column naming each image's split (train, val/validation, "
                      "test); without it the split is drawn per class (--recipe, "
                      "--split_fractions, --seed) and saved as split_manifest.json")
  p.add_argument("--hf_config", default="",
                 help="hf: the config of README.md's `configs` to read (default: its default)")
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
  p.add_argument("--duplicates", default="drop_from_train", choices=convert.DUPLICATE_POLICIES,
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


def _person_boxes(plan: sources.Plan, args, default: str = ""):
  """--person_boxes: a JSON file of boxes, or yolov3:CFG,WEIGHTS to detect them."""
  spec = args.person_boxes or default
  if not spec.startswith("yolov3:"):
    return convert.read_side_file(spec, "--person_boxes")
  from data_pipelines import yolov3  # pylint: disable=g-import-not-at-top
  cfg_path, weights_path = yolov3.parse_spec(spec)
  settings = {"cfg": os.path.abspath(cfg_path), "weights": os.path.abspath(weights_path),
              "weights_bytes": os.path.getsize(weights_path), "conf": args.yolo_conf,
              "rule": args.yolo_rule, "nms_iou": args.yolo_nms_iou, "size": args.yolo_size}

  def detector(todo):
    return yolov3.detect_files(todo, cfg_path, weights_path, args.yolo_conf, args.yolo_nms_iou,
                               args.yolo_batch, progress=not args.no_progress,
                               size=args.yolo_size or None, rule=args.yolo_rule)
  return convert.detect_person_boxes(plan, args.out, detector, settings)


def _plan(args) -> sources.Plan:
  splits = args.splits.split(",") if args.splits else list(sources.SPLITS)
  side_files = ("", "")
  if args.source == "synthetic":
    root = synthetic.raw_tree(args.out, args.name, [int(x) for x in args.per_class.split(",")],
                              args.image_size, args.seed, args.root)
    plan = sources.split_tree(root, args.name, splits)
    side_files = (os.path.join(root, "boxes.json"), os.path.join(root, "attributes.json"))
  else:
    manifest = convert.read_side_file(args.manifest, "--manifest")
    fractions = [float(x) for x in args.split_fractions.split(",")] if \
        args.split_fractions else ()
    plan = convert.build_plan(args.source, args.name, args.root, splits, recipe=args.recipe,
                              split_fractions=fractions, seed=args.seed, manifest=manifest,
                              image_column=args.image_column,
                              label_column=args.label_column, hf_config=args.hf_config,
                              labels=args.labels, split_column=args.split_column)
  sources.apply_side_files(
      plan, _person_boxes(plan, args, side_files[0]),
      convert.read_side_file(args.attributes or side_files[1], "--attributes"))
  return plan


def main(argv=None) -> int:
  args = parse_args(argv)
  convert.prepare_out_dir(args.out, args.name, args.overwrite)    # before anything is written
  plan = _plan(args)
  embedder = None
  if args.text_embeddings:
    from uniemox_jax.teacher import clip  # pylint: disable=g-import-not-at-top
    embedder = clip.ClipTeacher.load(args.text_embeddings).embed_texts
  info, report = convert.convert(
      plan, args.out, shard_size=args.shard_size, workers=args.workers,
      max_size=args.max_size, text_embedder=embedder, progress=not args.no_progress,
      tfds_metadata=not args.no_tfds_metadata, tfds_version=args.tfds_version,
      exif_orientation=args.exif_orientation, duplicates=args.duplicates,
      allow_empty_classes=args.allow_empty_classes)
  report_path = storage.join(args.out, convert.REPORT_FILE)
  print(convert.summary(info, report, report_path))
  check = verify.verify(args.out)
  print(check.summary())
  shards = sum(len(s.shards) for s in info.splits.values())
  print(f"wrote: {storage.absolute(args.out)} ({shards} shards with indexes, "
        f"{dataset_info.INFO_FILE}, {convert.REPORT_FILE}" + (
            "" if args.no_tfds_metadata else ", dataset_info.json, features.json") + ")")
  if not check.ok:
    return 1
  if args.strict and report["num_skipped"]:
    print(f"error: --strict: {report['num_skipped']} file(s) were not converted (listed "
          f"above and in {report_path}); the folder holds the rest", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  errors.run_command(main)

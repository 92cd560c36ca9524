"""The conversion tool: every source, the report, resume, and TensorFlow reading our shards."""
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import dataset_info
from data_pipelines import convert
from data_pipelines import records
from data_pipelines import sources
from data_pipelines import synthetic
from data_pipelines import tfrecord
from uniemox_jax.tools import convert as convert_command
from tests import formats


def _read_split(out, split):
  info = json.load(open(os.path.join(out, dataset_info.INFO_FILE)))
  paths = [os.path.join(out, s["file"]) for s in info["splits"][split]["shards"]]
  reader = tfrecord.RandomAccessReader(paths)
  return [records.parse(reader[i]) for i in range(len(reader))]


def _jpeg(path, color=(10, 20, 30), size=(40, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path, "JPEG")


def _run(*args):
  return convert_command.main([*args, "--workers", "1", "--no_progress"])


def test_synthetic_conversion_info_and_records(synthetic_data):
  raw, out = synthetic_data
  info = json.load(open(os.path.join(out, dataset_info.INFO_FILE)))
  assert info["class_names"] == sorted(synthetic.CLASSES)   # alphabetical folders
  assert {s: v["num_records"] for s, v in info["splits"].items()} == {
      "train": 48, "val": 16, "test": 16}
  assert info["splits"]["train"]["class_counts"] == [6] * 8
  assert len(info["splits"]["train"]["shards"]) == 3     # shard_size 20
  boxes = json.load(open(os.path.join(raw, "boxes.json")))
  recs = _read_split(out, "train")
  assert len(recs) == 48
  assert info["splits"]["train"]["with_person"] == sum(r["has_person"] for r in recs)
  for r in recs:
    assert r["label_name"] == info["class_names"][r["label"]]
    assert r["prompt"].endswith(f"The overall emotion conveyed is {r['label_name']}.")
    assert r["image"] == open(os.path.join(raw, r["source_path"]), "rb").read()
    box = boxes[r["source_path"]]
    if box is None:
      assert r["has_person"] == 0 and list(r["person_box"]) == [0, 0, 1, 1]
    else:
      x1, y1, x2, y2 = box
      np.testing.assert_allclose(r["person_box"], [y1 / 48, x1 / 48, y2 / 48, x2 / 48],
                                 atol=1e-6)
  report = json.load(open(os.path.join(out, convert.REPORT_FILE)))
  assert report["num_unreadable"] == 0 and not report["duplicates_across_splits"]


_TF_READER = r"""
import json, sys
import tensorflow as tf
tf.config.set_visible_devices([], "GPU")
spec = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "label_name": tf.io.FixedLenFeature([], tf.string),
    "prompt": tf.io.FixedLenFeature([], tf.string),
    "person_box": tf.io.FixedLenFeature([4], tf.float32),
    "has_person": tf.io.FixedLenFeature([], tf.int64),
}
out = []
for raw in tf.data.TFRecordDataset(sys.argv[1:]):
  ex = tf.io.parse_single_example(raw, spec)
  img = tf.io.decode_jpeg(ex["image"])
  out.append({"label": int(ex["label"]), "prompt": ex["prompt"].numpy().decode(),
              "box": [float(v) for v in ex["person_box"].numpy()],
              "shape": list(img.shape)})
print(json.dumps(out))
"""


def test_tensorflow_reads_our_shards(synthetic_data):
  """Ordinary TFRecords of tf.train.Example: TensorFlow's own reader checks our CRCs."""
  _, out = synthetic_data
  shards = sorted(glob.glob(os.path.join(out, "synthetic-train.tfrecord-*-of-*")))
  shards = [s for s in shards if not s.endswith((".index", ".json"))]
  proc = subprocess.run([sys.executable, "-c", _TF_READER, *shards], capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  theirs = json.loads(proc.stdout.strip().splitlines()[-1])
  ours = _read_split(out, "train")
  assert len(theirs) == len(ours) == 48
  for t, o in zip(theirs, ours):
    assert t["label"] == o["label"] and t["prompt"] == o["prompt"]
    np.testing.assert_allclose(t["box"], o["person_box"], rtol=1e-6)
    assert t["shape"] == [48, 48, 3]


def test_bad_inputs_are_reported_not_dropped(tmp_path):
  root = tmp_path / "tree"
  for split in ("train", "test"):
    for cls in ("calm", "angry"):
      for i in range(2):
        _jpeg(str(root / split / cls / f"{i}.jpg"), color=(i * 90, len(split) * 20, len(cls) * 40))
  os.makedirs(root / "train" / "sad")                            # empty class, missing in test
  (root / "train" / "calm" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  good = (root / "train" / "angry" / "0.jpg").read_bytes()
  (root / "train" / "angry" / "truncated.jpg").write_bytes(good[:len(good) // 2])
  shutil.copy(root / "train" / "calm" / "0.jpg", root / "test" / "calm" / "copy.jpg")
  out = tmp_path / "out"
  assert _run("--source", "split_tree", "--root", str(root), "--name", "t", "--out",
              str(out), "--allow_empty_classes") == 0
  report = json.load(open(out / convert.REPORT_FILE))
  assert report["num_unreadable"] == 2
  assert sorted(b["path"] for b in report["skipped_files"]) == [
      "train/angry/truncated.jpg", "train/calm/broken.jpg"]
  assert "class 'sad' is empty in split 'train'" in report["structure_problems"]
  assert "class 'sad' has no folder in split 'test'" in report["structure_problems"]
  dup = report["duplicates_across_splits"]
  assert dup == [{"train": ["train/calm/0.jpg"], "test": ["test/calm/copy.jpg"]}]
  assert report["duplicates_dropped_from_train"] == ["train/calm/0.jpg"]
  info = json.load(open(out / dataset_info.INFO_FILE))
  assert info["class_names"] == ["angry", "calm", "sad"]
  assert info["splits"]["train"]["num_records"] == 3


def test_resume_skips_finished_shards_and_redoes_partial_ones(synthetic_data, tmp_path):
  raw, _ = synthetic_data
  out = tmp_path / "out"
  args = ["--source", "split_tree", "--root", raw, "--name", "s", "--out", str(out),
          "--shard_size", "16", "--person_boxes", os.path.join(raw, "boxes.json")]
  _run(*args)
  shards = sorted(p for p in glob.glob(str(out / "s-train.tfrecord-*")) if p[-1].isdigit())
  assert len(shards) == 3
  before = {p: open(p, "rb").read() for p in shards}
  # A run killed mid-shard: the shard and its stats gone, a temporary file left behind.
  os.remove(shards[1])
  os.remove(shards[1] + ".stats.json")
  open(shards[1] + ".tmp-999", "wb").write(b"half")
  _run(*args)
  report = json.load(open(out / convert.REPORT_FILE))
  assert report["resumed_shards"] == 5 - 1    # 3 train + 1 val + 1 test, one redone
  assert {p: open(p, "rb").read() for p in shards} == before
  # Different contents (new boxes) invalidate every shard.
  _run(*args[:-2])
  assert json.load(open(out / convert.REPORT_FILE))["resumed_shards"] == 0


def test_class_folders_recipe_and_manifest(tmp_path):
  root = tmp_path / "raw"
  for c, cls in enumerate(("a", "b")):
    for i in range(20 + 10 * c):
      _jpeg(str(root / cls / f"{i}.jpg"), color=(c * 100, i * 7, 3))
  out1, out2, out3 = (tmp_path / n for n in ("o1", "o2", "o3"))
  _run("--source", "class_folders", "--recipe", "emotion6", "--seed", "3", "--root", str(root),
       "--name", "e6", "--out", str(out1))
  info = json.load(open(out1 / dataset_info.INFO_FILE))
  counts = {s: v["class_counts"] for s, v in info["splits"].items()}
  assert counts == {"train": [14, 21], "val": [2, 3], "test": [4, 6]}   # 70/10/20 per class
  manifest = json.load(open(out1 / convert.MANIFEST_FILE))
  _run("--source", "class_folders", "--manifest", str(out1 / convert.MANIFEST_FILE),
       "--root", str(root), "--name", "e6", "--out", str(out2))
  assert json.load(open(out2 / convert.MANIFEST_FILE)) == manifest
  _run("--source", "class_folders", "--recipe", "emotion6", "--seed", "4", "--root", str(root),
       "--name", "e6", "--out", str(out3))
  assert json.load(open(out3 / convert.MANIFEST_FILE)) != manifest
  with pytest.raises(ValueError, match="--recipe 'nope' is unknown"):
    _run("--source", "class_folders", "--recipe", "nope", "--root", str(root), "--name", "x",
         "--out", str(tmp_path / "o4"))


def test_caer_s_recipe_splits_test_into_test_and_val(tmp_path):
  root = tmp_path / "caer"
  for split, n in (("train", 4), ("test", 50)):
    for i in range(n):
      _jpeg(str(root / split / "Happy" / f"{i}.png").replace(".png", ".jpg"), (i, 1, 2))
  _run("--source", "class_folders", "--recipe", "caer_s", "--root", str(root), "--name", "c",
       "--out", str(tmp_path / "o"), "--duplicates", "keep")    # the fixture repeats images
  info = json.load(open(tmp_path / "o" / dataset_info.INFO_FILE))
  assert {s: v["num_records"] for s, v in info["splits"].items()} == {
      "train": 4, "val": 17, "test": 33}


def _emoset(root, bad_annotation=False, form=4, label2idx=None):
  """EmoSet in the release's form (4-column rows, info["emotion"]["label2idx"]) or the
  reference code's (form 3: [emotion, image_path, annotation_path], top-level label2idx)."""
  items = {"train": [], "val": []}
  for i, (emotion, split) in enumerate([("awe", "train"), ("fear", "train"),
                                        ("sadness", "val")]):
    img = f"image/{emotion}/{emotion}_{i}.jpg"
    ann = f"annotation/{emotion}/{emotion}_{i}.json"
    _jpeg(str(root / img), (i * 50, 10, 10))
    os.makedirs(root / os.path.dirname(ann), exist_ok=True)
    data = {"emotion": emotion, "brightness": 0.4, "colorfulness": 0.7, "scene": "valley",
            "object": ["tree", "river"], "facial_expression": None, "human_action": None}
    text = json.dumps(data)
    if bad_annotation and i == 1:
      text = text[:-5]
    (root / ann).write_text(text)
    items[split].append([emotion, f"{emotion}_{i}", img, ann] if form == 4 else
                        [emotion, img, ann])
  for split, lst in items.items():
    (root / f"{split}.json").write_text(json.dumps(lst))
  if label2idx is not None:
    info = {"emotion": {"label2idx": label2idx}} if form == 4 else {"label2idx": label2idx}
    (root / "info.json").write_text(json.dumps(info))


def test_emoset_attributes_become_prompts(tmp_path):
  _emoset(tmp_path / "emoset")
  _run("--source", "emoset", "--root", str(tmp_path / "emoset"), "--name", "emoset",
       "--out", str(tmp_path / "o"))
  recs = _read_split(str(tmp_path / "o"), "train")
  assert [r["label"] for r in recs] == [1, 6]            # EmoSet's own order: awe 1, fear 6
  assert recs[0]["prompt"] == (
      "The scene type of this photo is valley. The main subjects are tree and river. "
      "The image has a brightness of 0.4 and color saturation of 0.7. "
      "The overall emotion conveyed is awe.")
  assert recs[0]["attributes"]["objects"] == ["tree", "river"]


def test_malformed_emoset_json_names_file_and_entry(tmp_path):
  _emoset(tmp_path / "emoset", bad_annotation=True)
  with pytest.raises(ValueError, match=r"fear_1.json \(.*train.json entry 1\) is not valid"):
    _run("--source", "emoset", "--root", str(tmp_path / "emoset"), "--name", "e",
         "--out", str(tmp_path / "o"))
  (tmp_path / "emoset" / "train.json").write_text(json.dumps([["awe", "x.jpg"]]))
  with pytest.raises(ValueError, match=r"train.json entry 0: expected \[emotion"):
    _run("--source", "emoset", "--root", str(tmp_path / "emoset"), "--name", "e",
         "--out", str(tmp_path / "o"))
  # Rows of the reference's form beside the release's: refused, each list named with its form.
  (tmp_path / "emoset" / "train.json").write_text(json.dumps([["awe", "x.jpg", "a.json"]]))
  with pytest.raises(ValueError, match=r"the split lists mix EmoSet's forms: .*train.json: "
                     r"the UniEmoX reference code's .*val.json: the official"):
    _run("--source", "emoset", "--root", str(tmp_path / "emoset"), "--name", "e",
         "--out", str(tmp_path / "o"))


def test_emoset_as_the_reference_code_reads_it(tmp_path):
  """The reference's 3-column lists and top-level label2idx give the release's records."""
  order = {c: i for i, c in enumerate(sources.EMOSET_CLASSES)}
  _emoset(tmp_path / "release", label2idx=order)
  _emoset(tmp_path / "reference", form=3, label2idx=order)
  recs, reports = {}, {}
  for form in ("release", "reference"):
    _run("--source", "emoset", "--root", str(tmp_path / form), "--name", "emoset",
         "--out", str(tmp_path / f"o_{form}"))
    recs[form] = [[(r["image_id"], r["label"], r["image"], r["prompt"], r["attributes"])
                   for r in _read_split(str(tmp_path / f"o_{form}"), s)]
                  for s in ("train", "val")]
    reports[form] = json.load(open(tmp_path / f"o_{form}" / convert.REPORT_FILE))
  assert recs["reference"] == recs["release"] and len(recs["release"][0]) == 2
  assert reports["release"]["source_layout"] == (
      "the official EmoSet-118K release ([emotion, image_id, image_path, annotation_path] "
      "rows), classes from info.json['emotion']['label2idx']")
  assert reports["reference"]["source_layout"] == (
      "the UniEmoX reference code's EmoSet ([emotion, image_path, annotation_path] rows), "
      "classes from info.json['label2idx']")
  # A class map of another order: labels follow it (the reference trains with it), noted.
  shuffled = {c: i for i, c in enumerate(sorted(sources.EMOSET_CLASSES))}
  _emoset(tmp_path / "sorted", form=3, label2idx=shuffled)
  plan = sources.emoset(str(tmp_path / "sorted"))
  assert plan.class_names == sorted(sources.EMOSET_CLASSES)
  assert [e.label for e in plan.entries] == [shuffled[e.label_name] for e in plan.entries]
  assert any("orders the classes" in p for p in plan.problems)
  # The reference's info.json under the release's lists: the map is not where they keep it.
  _emoset(tmp_path / "mixed", label2idx=None)
  (tmp_path / "mixed" / "info.json").write_text(json.dumps({"label2idx": order}))
  with pytest.raises(ValueError, match=r"info.json \['emotion'\]\['label2idx'\] is missing: "
                     "the class map of the official EmoSet-118K release"):
    sources.emoset(str(tmp_path / "mixed"))


def test_emotic_multi_label_keeps_its_boxes(tmp_path):
  root = tmp_path / "emotic_root"
  _jpeg(str(root / "emotic" / "mscoco" / "images" / "a.jpg"), size=(100, 50))
  formats.emotic_mat(str(root / "Annotations" / "Annotations.mat"), {
      "train": [("mscoco/images", "a.jpg", [([10, 5, 60, 45], ["Happiness", "Peace"]),
                                            ([0, 0, 20, 50], ["Fear"])])],
      "test": [("mscoco/images", "a.jpg", [([5, 5, 50, 40], [["Sadness", "Pain",
                                                               "Fatigue"]])])]})
  _run("--source", "emotic", "--root", str(root), "--name", "emotic", "--out",
       str(tmp_path / "o"), "--duplicates", "keep")     # one photo in train and test
  recs = _read_split(str(tmp_path / "o"), "train")
  assert len(recs) == 2 and recs[0]["label"] == -1
  hot = sources.EMOTIC_CLASSES
  assert [hot[i] for i in np.flatnonzero(recs[0]["labels"])] == ["Happiness", "Peace"]
  assert [hot[i] for i in np.flatnonzero(recs[1]["labels"])] == ["Fear"]
  np.testing.assert_allclose(recs[0]["person_box"], [0.1, 0.1, 0.9, 0.6], atol=1e-6)
  assert recs[0]["prompt"] == "The overall emotion conveyed is Happiness and Peace."
  (test,) = _read_split(str(tmp_path / "o"), "test")
  assert test["prompt"] == "The overall emotion conveyed is Fatigue, Pain and Sadness."
  info = json.load(open(tmp_path / "o" / dataset_info.INFO_FILE))
  assert info["multi_label"] and "labels" in info["features"]
  assert info["splits"]["train"]["class_counts"][hot.index("Fear")] == 1


def test_emotic_unknown_category_is_named(tmp_path):
  root = tmp_path / "emotic_root"
  formats.emotic_mat(str(root / "Annotations" / "Annotations.mat"), {
      "train": [("mscoco/images", "a.jpg", [([10, 5, 60, 45], ["Happiness", "Joyfulness"])])]})
  with pytest.raises(ValueError, match=r"train\[0\] person 0: unknown categories "
                     r"\['Joyfulness'\]"):
    _run("--source", "emotic", "--root", str(root), "--name", "e", "--out",
         str(tmp_path / "o"))


def test_max_size_reencodes_and_keeps_relative_boxes(tmp_path):
  root = tmp_path / "tree"
  _jpeg(str(root / "train" / "a" / "big.jpg"), size=(400, 200))
  boxes = tmp_path / "boxes.json"
  boxes.write_text(json.dumps({"train/a/big.jpg": [100, 50, 300, 150]}))
  _run("--source", "split_tree", "--root", str(root), "--name", "m", "--out",
       str(tmp_path / "o"), "--max_size", "64", "--person_boxes", str(boxes))
  (rec,) = _read_split(str(tmp_path / "o"), "train")
  assert Image.open(io.BytesIO(rec["image"])).size == (128, 64)
  np.testing.assert_allclose(rec["person_box"], [0.25, 0.25, 0.75, 0.75])


def test_text_embeddings_are_stored(tmp_path, tiny_clip_dir, tiny_teacher):
  root = tmp_path / "tree"
  _jpeg(str(root / "train" / "awe" / "0.jpg"))
  _run("--source", "split_tree", "--root", str(root), "--name", "t", "--out",
       str(tmp_path / "o"), "--text_embeddings", tiny_clip_dir)
  (rec,) = _read_split(str(tmp_path / "o"), "train")
  np.testing.assert_allclose(rec["text_emb"], tiny_teacher.embed_texts([rec["prompt"]])[0],
                             rtol=1e-5, atol=1e-6)
  assert json.load(open(tmp_path / "o" / dataset_info.INFO_FILE))["text_emb_dim"] == 64


def test_wrong_root_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"--root .*nowhere is not a directory"):
    _run("--source", "split_tree", "--root", str(tmp_path / "nowhere"), "--name", "x",
         "--out", str(tmp_path / "o"))


def test_worker_processes_write_identical_shards(synthetic_data, tmp_path):
  raw, _ = synthetic_data
  outs = []
  for workers in ("1", "2"):
    out = tmp_path / f"w{workers}"
    convert_command.main(["--source", "split_tree", "--root", raw, "--name", "s", "--out", str(out),
                  "--shard_size", "16", "--workers", workers, "--no_progress"])
    outs.append(json.load(open(out / dataset_info.INFO_FILE)))
  assert outs[0] == outs[1]     # same files, record counts and sha256 checksums

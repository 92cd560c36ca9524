"""Datasets as their owners publish them, and converted folders a user can verify: real image
formats through both readers, UBE's nested classes, EmoSet's published lists, EMOTIC's
MATLAB structs, `data_pipelines.verify`, the checks when a split opens, reruns over damaged
or foreign folders, plain TFRecords indexed, the report and the duplicate policies."""
import glob
import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import dataset_info
from data_pipelines import convert
from data_pipelines import images
from data_pipelines import index_tfrecords
from data_pipelines import input_pipeline as ip
from data_pipelines import records
from data_pipelines import sources
from data_pipelines import tfrecord
from data_pipelines import transforms
from data_pipelines import verify
from uniemox_jax.tools import convert as convert_command
from tests import formats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return convert_command.main([*args, "--workers", "1", "--no_progress"])


def _records(out, split):
  source = ip.ShardSource(str(out), split)
  return [records.parse(source[i]) for i in range(len(source))]


def _report(out):
  return json.load(open(os.path.join(out, convert.REPORT_FILE)))


@pytest.fixture(scope="module")
def real_world(tmp_path_factory):
  """A split tree whose class folders hold every kind of file a real download does,
  converted once (with TFDS metadata)."""
  root = tmp_path_factory.mktemp("real_world") / "tree"
  for s, split in enumerate(("train", "test")):
    formats.real_world_class_folder(str(root / split / "happy"), seed=1 + 2 * s)
    formats.real_world_class_folder(str(root / split / "sad"), seed=2 + 2 * s)
  formats.clutter(str(root / "train" / "happy"))
  expected_bad = formats.broken(str(root / "train" / "sad"))
  out = root.parent / "out"
  code = _run("--source", "split_tree", "--root", str(root), "--name", "rw", "--out", str(out))
  return root, out, code, expected_bad


# TensorFlow runs in subprocesses: loaded beside JAX and PyTorch in one test process, it has
# crashed later tests.
_TFDS_DECODE = """
import sys, numpy as np, tensorflow_datasets as tfds
builder = tfds.builder_from_directory(sys.argv[1])
out = {}
for split in sys.argv[3:]:
  for ex in tfds.as_numpy(builder.as_dataset(split=split)):
    out[ex["image_id"].decode()] = ex["image"]
np.savez(sys.argv[2], **{k.replace("/", "|"): v for k, v in out.items()})
"""


def _python(code, *args):
  proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                        text=True, timeout=300, cwd=ROOT,
                        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_every_real_world_image_converts_and_both_readers_agree(real_world, tmp_path):
  root, out, code, _ = real_world
  assert code == 0
  ours = {r["image_id"]: transforms.to_array(transforms.decode(r["image"]))
          for split in ("train", "test") for r in _records(out, split)}
  names = os.listdir(root / "train" / "happy")
  images_per_class = len([n for n in names if n.lower().endswith(sources.IMAGE_EXTENSIONS)
                          and not n.startswith(".")])
  assert len(ours) == 4 * images_per_class           # nothing lost, no clutter converted
  # Ids keep the file names as given (spaces, accents, CJK, upper case) and the split once.
  assert "train/happy/été photo 1.jpeg" in ours and "test/sad/写真.PNG" in ours
  assert not any(i.startswith(("train/train/", "test/test/")) for i in ours)
  _python(_TFDS_DECODE, out, tmp_path / "tfds.npz", "train", "test")
  theirs = {k.replace("|", "/"): v for k, v in np.load(tmp_path / "tfds.npz").items()}
  assert sorted(theirs) == sorted(ours)
  for image_id, mine in ours.items():
    tf_pixels = theirs[image_id]
    assert tf_pixels.shape == mine.shape and mine.shape[2] == 3, image_id
    # PNG: the same pixels; JPEG: two builds of libjpeg, equal up to IDCT and upsampling
    # rounding.
    diff = np.abs(tf_pixels.astype(int) - mine.astype(int))
    png = image_id.lower().endswith((".png", ".gif", ".bmp", ".webp"))
    assert diff.max() <= (0 if png else 4) and diff.mean() < 2, image_id


def test_deep_and_paletted_images_keep_their_pixels(real_world):
  _, out, _, _ = real_world
  recs = {r["image_id"]: r for r in _records(out, "train")}
  pix = formats.gradient(seed=1)
  gray16 = transforms.to_array(transforms.decode(recs["train/happy/gray16.png"]["image"]))
  expected = formats.gray16_values(seed=1) >> 8
  np.testing.assert_array_equal(gray16[..., 0], expected)       # not solid white
  deep = transforms.to_array(transforms.decode(recs["train/happy/deep16.png"]["image"]))
  np.testing.assert_array_equal(deep, pix)                      # (v * 257) >> 8 == v
  gif = transforms.to_array(transforms.decode(recs["train/happy/anim.gif"]["image"]))
  assert gif.shape == pix.shape + (0,) * 0 and np.abs(gif.astype(int) - pix).mean() < 12
  # Kept as given: 8-bit RGB/gray JPEG and PNG (also PNG bytes under a .jpg name).
  src = lambda name: open(os.path.join(str(out.parent), "tree", "train", "happy", name),  # noqa
                          "rb").read()
  for name in ("baseline.jpg", "gray.jpg", "progressive.jpeg", "png inside.jpg"):
    assert recs[f"train/happy/{name}"]["image"] == src(name), name
  for name in ("cmyk.jpg", "anim.gif", "deep16.png", "palette.png", "lossless.webp"):
    assert recs[f"train/happy/{name}"]["image"] != src(name), name
  reencoded = _report(out)["reencoded_images"]
  assert any(k.startswith("JPEG CMYK") and k.endswith("JPEG RGB") for k in reencoded)
  assert any(k.startswith("GIF P") and k.endswith("PNG RGB") for k in reencoded)


def test_report_names_every_skipped_file_in_words(real_world):
  root, out, _, expected_bad = real_world
  report = _report(out)
  skipped = {os.path.basename(f["path"]): f["reason"] for f in report["skipped_files"]}
  assert set(skipped) == set(expected_bad) | {"notes.txt"}
  for name, start in expected_bad.items():
    assert skipped[name].startswith(start), skipped[name]
  assert "not an image file name (extension .txt)" in skipped["notes.txt"]
  assert not any(" at 0x" in r for r in skipped.values())      # no object addresses
  assert report["system_files_ignored"] == 3                   # .DS_Store, ._*, Thumbs.db
  # The closing summary lists them too, and --strict turns them into a failure.
  text = convert.summary(dataset_info.DatasetInfo.load(str(out)), report, "r.json")
  assert "skipped 4 file(s):" in text and "train/sad/empty.jpg: empty file" in text
  code = _run("--source", "split_tree", "--root", str(root), "--name", "rw", "--out",
              str(out), "--strict")
  assert code == 2                      # the user's data: exit 2, and the folder stays usable
  assert verify.verify(str(out)).ok


def test_exif_orientation_is_a_flag(tmp_path):
  pix = formats.gradient(size=(48, 32))
  path = tmp_path / "tree" / "train" / "a" / "rotated.jpg"
  os.makedirs(path.parent)
  path.write_bytes(formats.jpeg(pix, exif_orientation=6))
  for mode, size in (("ignore", (48, 32)), ("apply", (32, 48))):
    out = tmp_path / mode
    assert _run("--source", "split_tree", "--root", str(tmp_path / "tree"), "--name", "x",
                "--out", str(out), "--exif_orientation", mode, "--no_tfds_metadata") == 0
    (rec,) = _records(out, "train")
    assert Image.open(io.BytesIO(rec["image"])).size == size, mode
  with pytest.raises(SystemExit):
    _run("--source", "split_tree", "--root", str(tmp_path / "tree"), "--name", "x",
         "--out", str(tmp_path / "bad"), "--exif_orientation", "sideways")


# --- the sources, as published ----------------------------------------------------------------


def test_ube_nested_class_folders_convert(tmp_path):
  root = tmp_path / "UBE"
  for c, cls in enumerate(("anger", "joy", "sadness")):
    for sub in ("clip_01", "clip_02"):       # UBE's raw classes hold folders of frames
      for i in range(5):
        p = root / cls / sub / f"frame_{i:03d}.jpg"
        os.makedirs(p.parent, exist_ok=True)
        p.write_bytes(formats.jpeg(formats.gradient(seed=c * 100 + i + len(sub) * 7
                                                    + (sub == "clip_02") * 50)))
  out = tmp_path / "out"
  assert _run("--source", "class_folders", "--recipe", "ube", "--root", str(root), "--name",
              "ube", "--out", str(out), "--no_tfds_metadata") == 0
  info = json.load(open(out / dataset_info.INFO_FILE))
  assert info["class_names"] == ["anger", "joy", "sadness"]
  total = {c: sum(info["splits"][s]["class_counts"][i] for s in info["splits"])
           for i, c in enumerate(info["class_names"])}
  assert total == {"anger": 10, "joy": 10, "sadness": 10}
  assert all("/clip_0" in r["source_path"] for r in _records(out, "train"))


def test_a_raw_root_that_is_already_split_is_refused_with_what_was_found(tmp_path):
  root = tmp_path / "FI"
  for split in ("train", "val", "test"):
    p = root / split / "awe" / "0.jpg"
    os.makedirs(p.parent)
    p.write_bytes(formats.jpeg(formats.gradient()))
  os.makedirs(root / "amusement")
  (root / "amusement" / "1.jpg").write_bytes(formats.jpeg(formats.gradient()))
  with pytest.raises(ValueError, match=r"holds the split folders \['test', 'train', 'val'\] "
                     r"beside the class folders \['amusement'\]: .*--source split_tree"):
    _run("--source", "class_folders", "--recipe", "fi", "--root", str(root), "--name", "fi",
         "--out", str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / dataset_info.INFO_FILE)


def test_empty_class_folder_is_an_error_unless_allowed(tmp_path):
  root = tmp_path / "tree"
  for cls in ("calm", "sad"):
    os.makedirs(root / "train" / cls)
  (root / "train" / "calm" / "0.jpg").write_bytes(formats.jpeg(formats.gradient()))
  formats.clutter(str(root / "train" / "sad"))        # clutter does not make a class
  args = ("--source", "split_tree", "--root", str(root), "--name", "e", "--out",
          str(tmp_path / "out"), "--no_tfds_metadata")
  with pytest.raises(ValueError, match=r"empty class folder\(s\): sad \(train\)"):
    _run(*args)
  assert _run(*args, "--allow_empty_classes") == 0
  assert json.load(open(tmp_path / "out" / dataset_info.INFO_FILE))["class_names"] == ["calm", "sad"]


def test_emoset_published_lists_and_every_attribute(tmp_path):
  root = tmp_path / "EmoSet-118K"
  full = {"brightness": 0.4, "colorfulness": 0.7, "scene": "valley",
          "object": ["tree", "river"], "facial_expression": "happy",
          "human_action": "hiking"}
  formats.emoset(str(root), [("train", "awe", full), ("train", "fear", {"scene": "cave"}),
                             ("val", "sadness", {}), ("test", "anger", {"brightness": 0.0})])
  out = tmp_path / "out"
  assert _run("--source", "emoset", "--root", str(root), "--name", "emoset", "--out",
              str(out), "--no_tfds_metadata") == 0
  train = _records(out, "train")
  assert [r["label"] for r in train] == [1, 6]              # awe 1, fear 6 in EmoSet's order
  assert train[0]["attributes"] == {"brightness": 0.4, "colorfulness": 0.7, "scene": "valley",
                                    "objects": ["tree", "river"],
                                    "facial_expression": "happy", "human_action": "hiking"}
  assert train[1]["attributes"] == {"scene": "cave"}
  assert train[0]["source_path"] == "image/awe/awe_00000.jpg"
  assert _records(out, "test")[0]["attributes"] == {"brightness": 0.0}
  # The reference code's 3-element rows are read too (tests/test_convert.py), but one list of
  # them beside the release's lists is refused, each list named with its form.
  (root / "val.json").write_text(json.dumps([["sadness", "image/sadness/sadness_00000.jpg",
                                              "annotation/sadness/sadness_00000.json"]]))
  with pytest.raises(ValueError, match=r"mix EmoSet's forms: .*train.json: the official "
                     r"EmoSet-118K release .*val.json: the UniEmoX reference code's"):
    _run("--source", "emoset", "--root", str(root), "--name", "emoset", "--out",
         str(tmp_path / "o2"))


def test_emotic_as_matlab_writes_it(tmp_path):
  root = tmp_path / "emotic_root"
  for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg", "d.jpg")):
    p = root / "emotic" / "mscoco" / "images" / name
    os.makedirs(p.parent, exist_ok=True)
    p.write_bytes(formats.jpeg(formats.gradient(size=(100, 50), seed=i)))
  formats.emotic_mat(str(root / "Annotations" / "Annotations.mat"), {
      # One person with one category (MATLAB's 1x1 struct and 1x1 cell), then an image with
      # several people.
      "train": [("mscoco/images", "a.jpg", [([10, 5, 60, 45], ["Peace"])]),
                ("mscoco/images", "b.jpg", [([0, 0, 20, 50], ["Fear", "Pain"]),
                                            ([50, 10, 90, 40], ["Happiness"])])],
      # Val and test: several annotators per person; the record takes their union.
      "val": [("mscoco/images", "c.jpg", [([5, 5, 50, 40], [["Sadness"], ["Pain"]])])],
      "test": [("mscoco/images", "d.jpg", [([5, 5, 50, 40], [["Fatigue"]])])]})
  out = tmp_path / "out"
  assert _run("--source", "emotic", "--root", str(root), "--name", "emotic", "--out",
              str(out), "--no_tfds_metadata") == 0
  hot = sources.EMOTIC_CLASSES
  names = lambda r: [hot[i] for i in np.flatnonzero(r["labels"])]  # noqa: E731
  train = _records(out, "train")
  assert [names(r) for r in train] == [["Peace"], ["Fear", "Pain"], ["Happiness"]]
  assert [r["image_id"] for r in train] == [
      "train/mscoco/images/a.jpg#person0", "train/mscoco/images/b.jpg#person0",
      "train/mscoco/images/b.jpg#person1"]
  np.testing.assert_allclose(train[2]["person_box"], [0.2, 0.5, 0.8, 0.9], atol=1e-6)
  (val,) = _records(out, "val")
  assert names(val) == ["Pain", "Sadness"]
  assert names(_records(out, "test")[0]) == ["Fatigue"]


# --- verification -------------------------------------------------------------------------------


@pytest.fixture()
def converted(synthetic_data, tmp_path):
  raw, _ = synthetic_data
  out = tmp_path / "out"
  assert _run("--source", "split_tree", "--root", raw, "--name", "s", "--out", str(out),
              "--shard_size", "16", "--no_tfds_metadata") == 0
  return raw, out


def _shards(out, split):
  return sorted(p for p in glob.glob(str(out / f"s-{split}.tfrecord-*")) if p[-1].isdigit())


def test_verify_passes_a_fresh_folder_and_names_every_problem(converted):
  _, out = converted
  cli = [sys.executable, "-m", "data_pipelines.verify", str(out)]
  ok = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
  assert ok.returncode == 0 and "OK" in ok.stdout and "train: 48 records" in ok.stdout
  train = _shards(out, "train")
  data = bytearray(open(train[1], "rb").read())
  data[200] ^= 0x01                                  # one bit, inside record 0's payload
  open(train[1], "wb").write(bytes(data))
  info = json.load(open(out / dataset_info.INFO_FILE))
  info["splits"]["test"]["class_counts"][0] += 1     # a count nothing backs
  json.dump(info, open(out / dataset_info.INFO_FILE, "w"))
  stray = out / "s-train.tfrecord-00009-of-00010"
  shutil.copy(train[0], stray)
  bad = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1
  assert f"{train[1]}: sha256" in bad.stdout
  assert f"{train[1]}: record 0 is corrupt (data CRC mismatch)" in bad.stdout
  assert "split 'test': class counts differ" in bad.stdout
  assert f"{stray}: a shard of 's' that uniemox_info.json does not list" in bad.stdout
  assert "split 'train': class counts differ" in bad.stdout      # the unreadable record
  assert "5 problem(s)" in bad.stdout


def test_opening_a_split_refuses_shards_that_disagree_with_the_info(converted):
  _, out = converted
  val, test = _shards(out, "val")[0], _shards(out, "test")[0]
  assert len(ip.ShardSource(str(out), "val")) == 16
  # A test shard under the val shard's name: same record count, other split.
  for suffix in ("", ".index"):
    shutil.copy(test + suffix, val + suffix)
  info = json.load(open(out / dataset_info.INFO_FILE))
  size = os.path.getsize(val)
  info["splits"]["val"]["shards"][0]["bytes"] = size
  json.dump(info, open(out / dataset_info.INFO_FILE, "w"))
  with pytest.raises(verify.DatasetMismatchError, match=r"listed under split 'val' but its "
                     r"first record is 'test/"):
    ip.ShardSource(str(out), "val")
  # An info entry that says 0 records is not a reason to skip a shard silently.
  info["splits"]["train"]["shards"][1]["records"] = 0
  json.dump(info, open(out / dataset_info.INFO_FILE, "w"))
  with pytest.raises(verify.DatasetMismatchError, match=r"holds 16 records; uniemox_info.json "
                     r"says 0"):
    ip.ShardSource(str(out), "train")
  # A shard whose size is not the recorded one.
  info["splits"]["train"]["shards"][1]["records"] = 16
  info["splits"]["train"]["shards"][2]["bytes"] += 7
  json.dump(info, open(out / dataset_info.INFO_FILE, "w"))
  with pytest.raises(verify.DatasetMismatchError, match=r"s-train.tfrecord-00002-of-00003 is "
                     r"\d+ bytes; uniemox_info.json says \d+"):
    ip.ShardSource(str(out), "train")
  # An info file that does not parse is named, with what to do.
  (out / dataset_info.INFO_FILE).write_text('{"splits": ')
  with pytest.raises(ValueError, match=r"uniemox_info.json is not valid JSON .*rerun the "
                     "conversion"):
    dataset_info.DatasetInfo.load(str(out))


def test_rerun_rewrites_a_damaged_shard_and_removes_temporaries(converted):
  raw, out = converted
  train = _shards(out, "train")
  before = open(train[2], "rb").read()
  data = bytearray(before)
  data[100] ^= 0x10
  open(train[2], "wb").write(bytes(data))
  leftovers = [train[0] + ".tmp-4242", train[0] + ".tmp-4242.index",
               train[0] + ".stats.json.tmp-4242", str(out / "uniemox_info.json.tmp")]
  for p in leftovers:
    open(p, "wb").write(b"partial")
  assert _run("--source", "split_tree", "--root", raw, "--name", "s", "--out", str(out),
              "--shard_size", "16", "--no_tfds_metadata") == 0
  report = _report(out)
  assert report["rewritten_damaged_shards"] == [os.path.basename(train[2])]
  assert report["resumed_shards"] == 4
  assert open(train[2], "rb").read() == before
  assert not any(os.path.exists(p) for p in leftovers)
  assert verify.verify(str(out)).ok


def test_converting_into_another_dataset_is_refused_before_writing(converted, tmp_path):
  raw, out = converted
  snapshot = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  args = ["--source", "split_tree", "--root", raw, "--name", "other", "--out", str(out),
          "--shard_size", "16", "--no_tfds_metadata"]
  with pytest.raises(ValueError, match=r"holds the dataset 's' .*not 'other'.*--overwrite"):
    _run(*args)
  assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == snapshot
  # A folder of someone's own files is refused too.
  mine = tmp_path / "home"
  os.makedirs(mine)
  (mine / "thesis.tex").write_text("\\documentclass{article}")
  with pytest.raises(ValueError, match=r"holds files that no conversion of 'other' wrote "
                     r"\(thesis.tex\)"):
    _run(*[a if a != str(out) else str(mine) for a in args])
  assert _run(*args, "--overwrite") == 0
  assert sorted(json.load(open(out / dataset_info.INFO_FILE))["splits"]) == ["test", "train", "val"]
  assert not glob.glob(str(out / "s-*"))                  # the old dataset is gone whole
  assert verify.verify(str(out)).ok


# --- duplicates -------------------------------------------------------------------------------


def _dup_tree(root):
  seed = 0
  for split in ("train", "test"):
    for cls in ("calm", "angry"):
      for i in range(2):
        p = root / split / cls / f"{i}.jpg"
        os.makedirs(p.parent, exist_ok=True)
        seed += 1
        p.write_bytes(formats.jpeg(formats.gradient(seed=seed)))
  shutil.copy(root / "train" / "calm" / "0.jpg", root / "test" / "calm" / "copy.jpg")
  shutil.copy(root / "train" / "angry" / "0.jpg", root / "train" / "angry" / "again.jpg")


@pytest.mark.parametrize("policy", ["drop_from_train", "error", "keep"])
def test_duplicate_policies(tmp_path, policy):
  root = tmp_path / "tree"
  _dup_tree(root)
  args = ("--source", "split_tree", "--root", str(root), "--name", "d", "--out",
          str(tmp_path / "out"), "--no_tfds_metadata", "--duplicates", policy)
  if policy == "error":
    with pytest.raises(ValueError, match=r"1 image\(s\) appear in more than one split "
                       r"\(train/calm/0.jpg = test/calm/copy.jpg\)"):
      _run(*args)
    return
  assert _run(*args) == 0
  report = _report(tmp_path / "out")
  assert report["duplicates_across_splits"] == [
      {"train": ["train/calm/0.jpg"], "test": ["test/calm/copy.jpg"]}]
  assert report["duplicates_within_split"] == [
      {"split": "train", "files": ["train/angry/0.jpg", "train/angry/again.jpg"]}]
  ids = [r["image_id"] for r in _records(tmp_path / "out", "train")]
  assert ("train/calm/0.jpg" in ids) == (policy == "keep")
  assert report["duplicates_dropped_from_train"] == (
      ["train/calm/0.jpg"] if policy == "drop_from_train" else [])
  assert len(ids) == 5 - (policy == "drop_from_train")


# --- TFRecords written elsewhere ------------------------------------------------------------


def _foreign_records(n, split, labels=("calm", "angry")):
  out = []
  for i in range(n):
    label = i % len(labels)
    out.append(records.Record(formats.jpeg(formats.gradient(seed=i)), f"{split}/img{i}.jpg",
                              f"img{i}.jpg", label, labels[label], f"a {labels[label]} photo"))
  return out


# Serves write requests (path, compression, records) from stdin, one "ok" line each.
_TF_WRITER = """
import pickle, sys, tensorflow as tf
while True:
  size = sys.stdin.buffer.read(8)
  if not size:
    break
  out, kind, records = pickle.loads(sys.stdin.buffer.read(int.from_bytes(size, "little")))
  opts = tf.io.TFRecordOptions(compression_type=kind) if kind != "NONE" else None
  with tf.io.TFRecordWriter(out, opts) as w:
    for r in records:
      w.write(r)
  print("ok", flush=True)
"""


@pytest.fixture(scope="module")
def tf_write():
  """Writes records with TensorFlow's own tf.io.TFRecordWriter, in one subprocess for the
  module (TensorFlow takes ~10 s to import)."""
  proc = subprocess.Popen([sys.executable, "-c", _TF_WRITER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2"))

  def write(path, recs, kind="NONE"):
    request = pickle.dumps((str(path), kind, [r.serialize() for r in recs]))
    proc.stdin.write(len(request).to_bytes(8, "little") + request)
    proc.stdin.flush()
    assert proc.stdout.readline() == b"ok\n", proc.stderr.read()[-3000:]
  yield write
  proc.stdin.close()
  assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]


def test_plain_tfrecords_become_readable_with_one_command(tmp_path, tf_write):
  folder = tmp_path / "theirs"
  os.makedirs(folder)
  for split, files, n in (("train", 2, 5), ("validation", 1, 3)):
    recs = _foreign_records(n * files, "val" if split == "validation" else split)
    for f in range(files):
      tf_write(folder / f"{split}-{f:03d}.tfrecord", recs[f * n:(f + 1) * n])
  cmd = [sys.executable, "-m", "data_pipelines.index_tfrecords", str(folder), "--name", "t",
         "--splits", "train=train-*,val=validation-*"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "train: 10 records in 2 files" in proc.stdout and "OK" in proc.stdout
  info = dataset_info.DatasetInfo.load(str(folder))
  assert info.class_names == ("calm", "angry")
  assert info.splits["train"].class_counts == (5, 5)
  val = ip.ShardSource(str(folder), "val")
  assert [records.parse(val[i])["image_id"] for i in range(len(val))] == [
      "val/img0.jpg", "val/img1.jpg", "val/img2.jpg"]
  # Again on an indexed folder: refused, nothing changed.
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 2 and "already a dataset folder" in again.stderr


def test_indexed_records_whose_ids_carry_no_split_are_read(tmp_path, tf_write):
  folder = tmp_path / "plain_ids"
  os.makedirs(folder)
  recs = _foreign_records(4, "train")
  for r in recs:
    r.image_id = r.source_path               # "img0.jpg": no "train/" in front
  tf_write(folder / "train-000.tfrecord", recs)
  info = index_tfrecords.index_folder(str(folder), "p")
  assert info.split_ids is False
  source = ip.ShardSource(str(folder), "train")
  assert [records.parse(source[i])["image_id"] for i in range(len(source))] == [
      "img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]


@pytest.mark.parametrize("kind", ["GZIP", "ZLIB"])
def test_compressed_tfrecords_are_named(tmp_path, kind, tf_write):
  folder = tmp_path / "zipped"
  os.makedirs(folder)
  tf_write(folder / "train.tfrecord", _foreign_records(3, "train"), kind)
  if kind == "GZIP":
    assert gzip.decompress(open(folder / "train.tfrecord", "rb").read())
  with pytest.raises(tfrecord.CorruptRecordError, match=rf"train.tfrecord is a {kind}-"
                     "compressed TFRecord file; .*decompress it first"):
    index_tfrecords.index_folder(str(folder), "z")


def test_image_reasons_have_words_not_addresses():
  good = formats.jpeg(formats.gradient())
  for data, start in ((b"", "empty file"), (good[:len(good) // 2], "truncated image"),
                      (good[:300], "truncated image"), (b"hello", "not an image")):
    with pytest.raises(images.SkippedFile, match=f"^{start}") as e:
      images.prepare(data)
    assert " at 0x" not in str(e.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_person_boxes_turn_with_the_exif_orientation(orientation):
  pix = np.zeros((30, 40, 3), np.uint8)
  pix[6:12, 8:20] = 255                               # the "person": x 8..20, y 6..12
  stored = images.prepare(formats.png(pix) if orientation == 1 else
                          formats.jpeg(pix, exif_orientation=orientation),
                          exif_orientation="apply")
  img = transforms.to_array(transforms.decode(stored.data))
  ys, xs = np.nonzero(img[..., 0] > 128)
  h, w = img.shape[:2]
  seen = [ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w]
  np.testing.assert_allclose(stored.relative_box([8, 6, 20, 12]), seen, atol=0.04)

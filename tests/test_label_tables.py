"""--source table: a folder of images with the label tables pandas wrote (conftest's
`writer_fixtures`: to_csv, to_json records and lines)."""
import collections
import csv
import json
import os
import shutil

import pytest

from data_pipelines import convert
from data_pipelines import dataset_info
from data_pipelines import label_tables
from uniemox_jax.tools import convert as convert_command

OURS = {"train": "train", "validation": "val", "test": "test"}


@pytest.fixture(scope="module")
def tables(writer_fixtures):
  out, truth = writer_fixtures
  return out / "tables", truth["tables"]


def _run(*args):
  return convert_command.main([*args, "--workers", "1", "--no_progress"])


@pytest.mark.parametrize("table", ["labels.csv", "labels.jsonl", "labels.json"])
def test_each_table_form_keeps_its_split_and_labels(tables, table):
  root, rows = tables
  plan = label_tables.plan(str(root / table), "mine", image_column="path",
                           label_column="emotion", split_column="split")
  assert plan.class_names == sorted({r["emotion"] for r in rows})
  got = sorted((e.rel_path, e.label_name, e.split) for e in plan.entries)
  assert got == sorted((r["path"], r["emotion"], OURS[r["split"]]) for r in rows)
  assert all(e.path == str(root / e.rel_path) for e in plan.entries)
  assert plan.layout == (f"a table of labels ({table}): splits from column 'split'; class "
                         "names sorted alphabetically")
  assert plan.problems == []


def test_convert_command_writes_the_table(tables, tmp_path):
  root, rows = tables
  out = tmp_path / "shards"
  # No --root: the paths start at the table's folder.
  assert _run("--source", "table", "--labels", str(root / "labels.csv"), "--image_column",
              "path", "--label_column", "emotion", "--split_column", "split", "--name", "mine",
              "--out", str(out)) == 0
  info = json.load(open(out / dataset_info.INFO_FILE))
  want = collections.Counter(OURS[r["split"]] for r in rows)
  assert {s: v["num_records"] for s, v in info["splits"].items()} == dict(want)
  report = json.load(open(out / convert.REPORT_FILE))
  assert report["source_layout"].startswith("a table of labels (labels.csv)")


def test_without_a_split_column_each_class_is_split_by_seed(tables, tmp_path):
  root, rows = tables
  args = ("--source", "table", "--labels", str(root / "labels.jsonl"), "--image_column", "path",
          "--label_column", "emotion", "--split_fractions", "0.5,0.25,0.25", "--name", "mine")
  assert _run(*args, "--seed", "3", "--out", str(tmp_path / "a")) == 0
  manifest = json.load(open(tmp_path / "a" / convert.MANIFEST_FILE))
  # Stratified: each class's 8 images are split 4 / 2 / 2.
  for split, n in (("train", 4), ("val", 2), ("test", 2)):
    by_class = collections.Counter(p.split("/")[1] for p in manifest[split])
    assert by_class == {c: n for c in ("amusement", "anger", "awe")}, split
  assert sorted(p for ps in manifest.values() for p in ps) == sorted(r["path"] for r in rows)
  # The same seed draws the same split; another seed another; the manifest reproduces it.
  same = label_tables.plan(str(root / "labels.jsonl"), "m", image_column="path",
                           label_column="emotion", fractions=(0.5, 0.25, 0.25), seed=3)
  assert same.manifest == manifest
  other = label_tables.plan(str(root / "labels.jsonl"), "m", image_column="path",
                            label_column="emotion", fractions=(0.5, 0.25, 0.25), seed=4)
  assert other.manifest != manifest
  again = label_tables.plan(str(root / "labels.jsonl"), "m", image_column="path",
                            label_column="emotion", manifest=manifest)
  assert again.manifest == manifest and "the split of --manifest" in again.layout


def test_integer_labels_unlabelled_rows_and_repeats(tmp_path, tables):
  root, rows = tables
  table = tmp_path / "ints.csv"
  with open(table, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "label", "split"])
    w.writerow([str(root / rows[0]["path"]), "2", "train"])      # an absolute path
    w.writerow([rows[1]["path"], "0", "dev"])
    w.writerow([rows[1]["path"], "0", "dev"])                     # the same row again
    w.writerow([rows[2]["path"], "", "test"])                     # no label
    w.writerow([rows[3]["path"], "1", "test"])
  plan = label_tables.plan(str(table), "ints", root=str(root), split_column="split")
  assert plan.class_names == ["0", "1", "2"]
  assert [(e.rel_path, e.label, e.split) for e in plan.entries] == [
      (rows[0]["path"], 2, "train"), (rows[1]["path"], 0, "val"), (rows[3]["path"], 1, "test")]
  assert any("listed again in row 3" in p for p in plan.problems)
  assert any("1 row(s) of --labels" in p and "have no label" in p for p in plan.problems)


def test_bad_tables_are_named(tables, tmp_path):
  root, rows = tables
  with pytest.raises(ValueError, match=r"labels.csv has no column 'label' \(--label_column\); "
                     r"its columns are \['path', 'emotion', 'split'\]"):
    label_tables.plan(str(root / "labels.csv"), "x", image_column="path")
  with pytest.raises(ValueError, match=r"give --recipe .* or --split_fractions"):
    label_tables.plan(str(root / "labels.csv"), "x", image_column="path",
                      label_column="emotion")
  with pytest.raises(FileNotFoundError, match=r"--labels .*nowhere.csv does not exist"):
    label_tables.plan(str(tmp_path / "nowhere.csv"), "x")
  clash = tmp_path / "clash.jsonl"
  clash.write_text('{"image": "a.png", "label": "awe"}\n{"image": "a.png", "label": "anger"}\n')
  with pytest.raises(ValueError, match=r"'a.png' is listed twice with two labels, 'awe' \(row "
                     r"1\) and 'anger' \(row 2\)"):
    label_tables.plan(str(clash), "x")
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"image": "a.png", "label": "awe"}\n{"image": \n')
  with pytest.raises(ValueError, match=r"broken.jsonl line 2 is not valid JSON"):
    label_tables.plan(str(broken), "x")
  with pytest.raises(ValueError, match=r"--labels \(a .csv, .tsv, .json or .jsonl table\) is "
                     "required for --source table"):
    _run("--source", "table", "--name", "x", "--out", str(tmp_path / "o"))


def test_a_listed_image_that_is_missing_is_reported(tables, tmp_path):
  root, rows = tables
  mine = tmp_path / "mine"
  shutil.copytree(root, mine)
  os.remove(mine / rows[0]["path"])
  out = tmp_path / "o"
  assert _run("--source", "table", "--labels", str(mine / "labels.json"), "--image_column",
              "path", "--label_column", "emotion", "--split_column", "split", "--name", "m",
              "--out", str(out)) == 0
  report = json.load(open(out / convert.REPORT_FILE))
  assert report["skipped_files"] == [{"path": rows[0]["path"], "reason": "file not found",
                                      "split": "train"}]
  assert sum(report["written"].values()) == len(rows) - 1

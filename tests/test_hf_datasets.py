"""--source hf against folders the `datasets` library wrote (conftest's `writer_fixtures`),
compared with what `datasets` itself reads there."""
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import convert
from data_pipelines import dataset_info
from data_pipelines import hf_datasets
from data_pipelines import records
from data_pipelines import tfrecord
from uniemox_jax.tools import convert as convert_command

OURS = {"train": "train", "validation": "val", "test": "test"}


@pytest.fixture(scope="module")
def written(writer_fixtures):
  return writer_fixtures


def _pixels(data: bytes) -> str:
  with Image.open(io.BytesIO(data)) as img:
    return hashlib.sha1(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


def _rows(plan):
  out = {}
  for e in plan.entries:
    out.setdefault(e.split, []).append(
        [e.label_name, _pixels(convert.source_bytes(e))])
  return out


def _expected(truth, names):
  """`datasets`' rows as (class name, pixels), unlabelled (-1) rows left out, our splits."""
  return {OURS[split]: [[v if isinstance(v, str) else names[v], px] for v, px in rows
                        if v != -1]
          for split, rows in truth["splits"].items()}


@pytest.mark.parametrize("fixture,columns,layout", [
    ("hub", {}, "hub parquet, splits from README.md configs (default); class names from "
     "data/train-00000-of-00002.parquet schema metadata"),
    ("hub_bare", {}, "hub parquet, splits from file names; class names from README.md "
     "dataset_info"),
    ("disk_dict", {"image_column": "picture", "label_column": "emotion"},
     "save_to_disk DatasetDict (dataset_dict.json); class names from the strings of column "
     "'emotion'"),
    ("disk_single", {}, "save_to_disk Dataset (state.json); class names from "
     "data-00000-of-00001.arrow schema metadata"),
])
def test_reads_what_datasets_reads(written, fixture, columns, layout):
  out, truth = written
  plan = hf_datasets.plan(str(out / fixture), fixture, **columns)
  names = truth[fixture]["class_names"]
  if names is None:       # a string label column: its values, sorted as class folders are
    names = sorted({v for rows in truth[fixture]["splits"].values() for v, _ in rows})
  assert plan.class_names == names
  assert _rows(plan) == _expected(truth[fixture], names)
  assert plan.layout == f"Hugging Face {layout}"
  for e in plan.entries:
    assert e.label == names.index(e.label_name)


def test_missing_splits_and_unlabelled_rows_are_reported(written):
  out, _ = written
  hub = hf_datasets.plan(str(out / "hub"), "hub")
  assert hub.problems == ["1 row(s) of split 'test' have no label (-1 or empty); left out"]
  bare = hf_datasets.plan(str(out / "hub_bare"), "bare")
  assert bare.problems == [f"no 'test' split in {out / 'hub_bare'}"]
  single = hf_datasets.plan(str(out / "disk_single"), "single", splits=["test"])
  assert single.problems == [] and single.splits() == ["test"]


def test_convert_command_writes_the_hub_folder(written, tmp_path, capsys):
  out, truth = written
  shards = tmp_path / "shards"
  assert convert_command.main(["--source", "hf", "--root", str(out / "hub"), "--name", "emo",
                               "--out", str(shards), "--shard_size", "4", "--workers", "1",
                               "--no_progress"]) == 0
  printed = capsys.readouterr().out
  assert "read: Hugging Face hub parquet, splits from README.md configs" in printed
  info = json.load(open(shards / dataset_info.INFO_FILE))
  assert info["class_names"] == truth["hub"]["class_names"]
  expected = _expected(truth["hub"], info["class_names"])
  for split, rows in expected.items():
    paths = [str(shards / s["file"]) for s in info["splits"][split]["shards"]]
    reader = tfrecord.RandomAccessReader(paths)
    recs = [records.parse(reader[i]) for i in range(len(reader))]
    assert [[r["label_name"], _pixels(r["image"])] for r in recs] == rows
    # The stable id: the data file and row the image came from.
    assert recs[0]["source_path"].startswith(f"data/{'validation' if split == 'val' else split}-")
    assert recs[0]["source_path"].endswith("[0]")
  report = json.load(open(shards / convert.REPORT_FILE))
  assert report["source_layout"].startswith("Hugging Face hub parquet")
  assert report["written"] == {"train": 10, "val": 4, "test": 3}


def test_a_missing_image_file_is_reported_and_the_rest_converted(written, tmp_path):
  out, _ = written
  root = tmp_path / "bare"
  shutil.copytree(out / "hub_bare", root)
  os.remove(root / "images" / "train_2.png")
  shards = tmp_path / "shards"
  convert_command.main(["--source", "hf", "--root", str(root), "--name", "bare", "--out",
                        str(shards), "--workers", "1", "--no_progress"])
  report = json.load(open(shards / convert.REPORT_FILE))
  (bad,) = report["skipped_files"]
  assert bad["path"] == "data/train-00000-of-00001.parquet[2]"
  assert "'images/train_2.png', which does not exist" in bad["reason"]
  assert report["written"] == {"train": 5, "val": 3}


def test_bad_columns_and_folders_are_named(written, tmp_path):
  out, _ = written
  with pytest.raises(ValueError, match=r"train-00000-of-00002.parquet has no column 'emotion' "
                     r"\(--label_column\); its columns are \['image', 'label'\]"):
    hf_datasets.plan(str(out / "hub"), "x", label_column="emotion")
  with pytest.raises(ValueError, match=r"no column 'img' \(--image_column\)"):
    hf_datasets.plan(str(out / "hub"), "x", image_column="img")
  with pytest.raises(ValueError, match=r"column 'label' \(--image_column\) is int64, not an "
                     "image"):
    hf_datasets.plan(str(out / "hub"), "x", image_column="label")
  with pytest.raises(ValueError, match=r"--hf_config 'large' is not in .*README.md configs "
                     r"\(configs: \['default'\]\)"):
    hf_datasets.plan(str(out / "hub"), "x", config="large")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"--root .*empty holds no Hugging Face dataset"):
    hf_datasets.plan(str(tmp_path / "empty"), "x")
  # Integer labels with their names nowhere: refused, naming where names are looked for.
  bare = tmp_path / "nameless"
  shutil.copytree(out / "hub_bare", bare)
  os.remove(bare / "README.md")
  with pytest.raises(ValueError, match=r"holds integer labels and no class names were found"):
    hf_datasets.plan(str(bare), "x")
  # A damaged data file: named, with what pyarrow said.
  broken = tmp_path / "broken"
  shutil.copytree(out / "hub", broken)
  with open(broken / "data" / "validation-00000-of-00001.parquet", "wb") as f:
    f.write(b"not parquet")
  with pytest.raises(ValueError, match=r"validation-00000-of-00001.parquet cannot be read as a "
                     "parquet file"):
    hf_datasets.plan(str(broken), "x")

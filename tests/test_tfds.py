"""Converted datasets are TFDS datasets; TFDS-built datasets are read by the grain pipelines."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from uniemox_jax.tools import convert as convert_command
from data_pipelines import dataset_info
from data_pipelines import input_pipeline as ip
from data_pipelines import records
from data_pipelines import tfds_builders
from data_pipelines import tfds_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grain_records(data_dir, split):
  source = ip.ShardSource(data_dir, split)
  return [records.parse(source[i]) for i in range(len(source))]


def _same(rec, ex):
  """A record read by our pipeline and a TFDS example (images not decoded) agree."""
  assert ex["image"] == rec["image"]
  assert ex["image_id"].decode() == rec["image_id"]
  assert ex["source_path"].decode() == rec["source_path"]
  assert int(ex["label"]) == rec["label"]
  assert ex["label_name"].decode() == rec["label_name"]
  assert ex["prompt"].decode() == rec["prompt"]
  assert json.loads(ex["attributes"]) == rec["attributes"]
  np.testing.assert_array_equal(ex["person_box"], rec["person_box"])
  assert int(ex["has_person"]) == rec["has_person"]


def test_converted_folder_is_a_tfds_dataset(synthetic_data, tmp_path):
  _, data = synthetic_data
  builder = tfds.builder_from_directory(data)
  info = dataset_info.DatasetInfo.load(data)
  assert builder.info.features["label"].names == list(info.class_names)
  for split in ("train", "val", "test"):
    assert builder.info.splits[split].num_examples == info.splits[split].num_records
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    examples = {ex["image_id"].decode(): ex for ex in tfds.as_numpy(ds)}
    ours = _grain_records(data, split)
    assert len(examples) == len(ours) > 0
    for rec in ours:
      _same(rec, examples[rec["image_id"]])
  # Decoded by TFDS, an image is the one our pipeline decodes (up to the JPEG decoders'
  # rounding: TensorFlow's and Pillow's IDCT and chroma upsampling differ by a few levels).
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False))))
  from data_pipelines import transforms
  rec = next(r for r in _grain_records(data, "test") if r["image_id"] == ex["image_id"].decode())
  ours = np.asarray(transforms.decode(rec["image"]))
  assert ex["image"].shape == ours.shape
  assert np.abs(ex["image"].astype(int) - ours.astype(int)).mean() < 1.5

  # In TFDS's <data_dir>/<name>/<version>/ layout, tfds.load finds it by name.
  layout = tmp_path / "tfds" / "synthetic" / "1.0.0"
  shutil.copytree(data, layout, ignore=shutil.ignore_patterns("raw"))
  loaded = tfds.load("synthetic", data_dir=str(tmp_path / "tfds"), split="val",
                     shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  examples = {ex["image_id"].decode(): ex for ex in tfds.as_numpy(loaded)}
  for rec in _grain_records(data, "val"):
    _same(rec, examples[rec["image_id"]])


def test_multi_label_and_text_embedding_features():
  feats = tfds_format.features(["a", "b", "c"], multi_label=True, text_emb_dim=4)
  assert feats["labels"].shape == (3,) and feats["text_emb"].shape == (4,)
  assert feats["label"].np_dtype == np.int64
  assert tfds_format._version_of("/x/emo8/2.1.0") == "2.1.0"
  assert tfds_format._version_of("/x/emo8") == "1.0.0"


@pytest.fixture(scope="module")
def manual_dir(synthetic_data, tmp_path_factory):
  """Fake manual files: the synthetic raw tree in the authors' split-folder layout, with the
  side files the builders pick up by name."""
  raw, _ = synthetic_data
  manual = tmp_path_factory.mktemp("manual") / "Emo8"
  shutil.copytree(raw, manual)
  shutil.move(manual / "boxes.json", manual / "person_boxes.json")
  return str(manual)


def test_tfds_builder_matches_the_cli_and_reads_with_grain(manual_dir, tmp_path):
  built = tfds_builders.build("emo8", manual_dir, str(tmp_path / "tfds"))
  assert built == str(tmp_path / "tfds" / "emo8" / "1.0.0")
  cli = str(tmp_path / "cli")
  assert convert_command.main(["--source", "split_tree", "--root", manual_dir, "--name", "emo8",
                       "--out", cli, "--person_boxes",
                       os.path.join(manual_dir, "person_boxes.json"), "--attributes",
                       os.path.join(manual_dir, "attributes.json"), "--workers", "1",
                       "--no_progress", "--no_tfds_metadata"]) == 0
  assert not os.path.exists(os.path.join(cli, tfds_format.DATASET_INFO_FILE))
  info = dataset_info.DatasetInfo.load(built)   # from TFDS's metadata: no uniemox_info.json
  assert info.class_names == dataset_info.DatasetInfo.load(cli).class_names
  for split in ("train", "val", "test"):
    tfds_recs = {r["image_id"]: r for r in _grain_records(built, split)}
    cli_recs = {r["image_id"]: r for r in _grain_records(cli, split)}
    assert tfds_recs.keys() == cli_recs.keys() and tfds_recs
    for key, rec in cli_recs.items():
      other = tfds_recs[key]
      for field in ("image", "label", "label_name", "prompt", "attributes", "has_person",
                    "source_path"):
        assert other[field] == rec[field], (key, field)
      np.testing.assert_array_equal(other["person_box"], rec["person_box"])
  # The pipelines read the TFDS-built folder: every test example exactly once.
  ds = ip.eval_dataset(built, "test", batch_size=5, image_size=32)
  seen = [i for b in ds for i in b["index"][b["mask"]]]
  assert sorted(seen) == list(range(info.splits["test"].num_records))
  batch = next(iter(ip.pretrain_dataset(built, "train", batch_size=4, image_size=32)))
  assert batch["scene"].shape == (4, 32, 32, 3)


def test_builder_cli(manual_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="--manual_dir .* does not exist:\n.*split "
                                              "folders"):
    tfds_builders.main(["fi", "--manual_dir", str(tmp_path / "none"), "--data_dir",
                        str(tmp_path)])
  assert tfds_builders.main(["ube", "--manual_dir", manual_dir, "--data_dir", str(tmp_path),
                             "--list_classes"]) == 0


def test_builder_names_a_class_mismatch(manual_dir, tmp_path):
  with pytest.raises(ValueError, match=r"the emotion6 builder expects the classes .* the "
                                       r"folder has \['amusement'"):
    tfds_builders.build("emotion6", manual_dir, str(tmp_path))


_NO_TF = r"""
import sys
from data_pipelines import input_pipeline as ip
ds = ip.pretrain_dataset(sys.argv[1], "train", batch_size=4, image_size=32)
it = ip.make_iterator(ds, workers=1)
next(it)
it.close()
print(sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules))
"""


def test_grain_pipeline_imports_no_tensorflow(synthetic_data):
  _, data = synthetic_data
  proc = subprocess.run([sys.executable, "-c", _NO_TF, data], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_one_catalogue_drives_converter_builders_and_configs():
  """Each benchmark is described once (data_pipelines/catalogue.py); the split recipes of the
  converter, the TFDS builders and the fine-tuning configs are read from it."""
  from configs import finetune as finetune_config
  from data_pipelines import catalogue
  from data_pipelines import sources
  assert set(tfds_builders.BUILDERS) == set(catalogue.CATALOGUE) == set(finetune_config.DATASETS)
  for name, entry in catalogue.CATALOGUE.items():
    builder = tfds.builder_cls(name)              # registered with TFDS under its name
    assert builder is tfds_builders.BUILDERS[name]
    assert (tuple(builder.CLASSES), builder.SOURCE, builder.MULTI_LABEL) == (
        entry.classes, entry.source, entry.multi_label)
    assert builder.MANUAL_DOWNLOAD_INSTRUCTIONS == entry.manual_instructions
    config = finetune_config.get_config(f"dataset={name}")
    assert (config.num_classes, config.multi_label, config.batch_size) == (
        entry.num_classes, entry.multi_label, entry.batch_size)
    assert sources.RECIPES.get(name) == entry.recipe


_BUILD_WITHOUT_TF = r"""
import sys
from data_pipelines import tfds_builders
try:
  tfds_builders.build("emo8", sys.argv[1], sys.argv[2])
except ImportError as e:
  print(e)
"""


def test_builders_without_tensorflow_say_what_to_install(manual_dir, tmp_path):
  """TensorFlow is the `tfds` extra's, not the trainer's: a builder run without it says so."""
  blocker = tmp_path / "blocker" / "tensorflow"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('No module named tensorflow')\n")
  env = dict(os.environ, PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}")
  proc = subprocess.run([sys.executable, "-c", _BUILD_WITHOUT_TF, manual_dir,
                         str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "building 'emo8' with TFDS needs TensorFlow" in proc.stdout, proc.stdout
  assert "pip install -e '.[tfds]'" in proc.stdout and "uniemox_jax.tools.convert" in proc.stdout
  assert not (tmp_path / "out").exists()

"""Top-k emotions for a folder of images with a fine-tuned checkpoint (uniemox_jax/prediction.py)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from uniemox_jax import prediction


def test_predict_folder_to_csv_and_json(finetuned, tmp_path):
  workdir, config, _ = finetuned
  images = tmp_path / "images"
  # The converter generated the raw tree inside the data folder.
  shutil.copytree(os.path.join(config.data.dir, "raw", "test"), images)
  (images / "broken.jpg").write_bytes(b"not an image")
  paths = prediction.list_images(str(images))
  result = prediction.predict(config, os.path.join(workdir, "best"), paths, top_k=3)
  assert len(result["rows"]) == len(paths) - 1
  assert [p for p, _ in result["unreadable"]] == [str(images / "broken.jpg")]
  first = result["rows"][0]["predictions"]
  assert len(first) == 3 and first[0]["probability"] >= first[1]["probability"]
  prediction.write(result, str(tmp_path / "p.csv"), str(images), 3)
  rows = list(csv.reader(open(tmp_path / "p.csv")))
  assert rows[0][:3] == ["path", "emotion_1", "prob_1"] and len(rows) == len(paths)
  prediction.write(result, str(tmp_path / "p.json"), str(images), 3)
  assert len(json.load(open(tmp_path / "p.json"))["predictions"]) == len(paths) - 1
  # The images' folder names are their true classes: most predictions match.
  hits = [r["predictions"][0]["emotion"] == os.path.basename(os.path.dirname(r["path"]))
          for r in result["rows"]]
  assert np.mean(hits) >= 2 / 8
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    prediction.list_images(str(tmp_path / "nope"))

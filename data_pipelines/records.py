"""The record schema: one `tf.train.Example` per image (or per person, for EMOTIC).

  image         bytes    encoded image (the original file, or re-encoded JPEG after --max_size)
  image_id      bytes    stable id: "<split>/<path relative to the source root>"
  source_path   bytes    the file it came from, relative to the source root
  label         int64    class index (alphabetical class folder order), -1 for multi-label data
  label_name    bytes    class name ("" for multi-label data)
  labels        int64[C] multi-hot labels (multi-label datasets only)
  prompt        bytes    the text prompt of docs/method.md §2
  attributes    bytes    JSON object of the EmoSet-style attributes present
  person_box    float[4] [ymin, xmin, ymax, xmax], relative to the image size (TFDS's BBox)
  has_person    int64    1 if person_box is a detected/annotated person, 0 for the whole image
  text_emb      float[D] CLIP text embedding of the prompt (optional, --text_embeddings)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Sequence

import numpy as np

from data_pipelines import example_proto

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
# The features every record has; "labels" (multi-label data) and "text_emb" are optional.
FEATURES = ("image", "image_id", "source_path", "label", "label_name", "prompt", "attributes",
            "person_box", "has_person")


@dataclasses.dataclass
class Record:
  image: bytes
  image_id: str
  source_path: str
  label: int
  label_name: str
  prompt: str
  attributes: Dict[str, Any] = dataclasses.field(default_factory=dict)
  person_box: Optional[Sequence[float]] = None   # relative [ymin, xmin, ymax, xmax]
  labels: Optional[Sequence[int]] = None          # multi-hot, multi-label datasets
  text_emb: Optional[np.ndarray] = None

  def features(self) -> Dict[str, Any]:
    """The record as feature values, by schema name: what `serialize` writes, and what a
    TFDS builder yields (data_pipelines/tfds_builders.py)."""
    has_person = self.person_box is not None
    feats = {
        "image": self.image,
        "image_id": self.image_id,
        "source_path": self.source_path,
        "label": int(self.label),
        "label_name": self.label_name,
        "prompt": self.prompt,
        "attributes": json.dumps(self.attributes, sort_keys=True),
        "person_box": np.asarray(self.person_box if has_person else WHOLE_IMAGE, np.float32),
        "has_person": int(has_person),
    }
    if self.labels is not None:
      feats["labels"] = np.asarray(self.labels, np.int64)
    if self.text_emb is not None:
      feats["text_emb"] = np.asarray(self.text_emb, np.float32)
    return feats

  def serialize(self) -> bytes:
    return example_proto.serialize(self.features())


def parse(data: bytes) -> Dict[str, Any]:
  """Serialized record -> dict of Python/NumPy values (image stays encoded)."""
  raw = example_proto.parse(data)
  out = {
      "image": raw["image"][0],
      "image_id": raw["image_id"][0].decode(),
      "source_path": raw["source_path"][0].decode(),
      "label": int(raw["label"][0]),
      "label_name": raw["label_name"][0].decode(),
      "prompt": raw["prompt"][0].decode(),
      "attributes": json.loads(raw["attributes"][0]),
      "person_box": np.asarray(raw["person_box"], np.float32),
      "has_person": int(raw["has_person"][0]),
  }
  if "labels" in raw:
    out["labels"] = np.asarray(raw["labels"], np.int64)
  if "text_emb" in raw:
    out["text_emb"] = np.asarray(raw["text_emb"], np.float32)
  return out

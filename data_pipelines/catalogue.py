"""The benchmark datasets, each described once: its classes, whether it is multi-label, how the
conversion reads it, its split recipe, and the fine-tuning batch that gives it at least 20
optimizer steps per epoch.

Read by the conversion's sources (class lists, split recipes), the TFDS builders (one builder
per entry) and the fine-tuning configs (classes, batch, training-set size).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

# The Mikels eight in alphabetical order: the class-folder order of the authors' split trees.
MIKELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear",
          "sadness")
# EmoSet-118K's own index order of the same eight.
EMOSET_CLASSES = ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear",
                  "sadness")
# EMOTIC's 26 discrete categories, in the dataset's own order.
EMOTIC_CLASSES = (
    "Affection", "Anger", "Annoyance", "Anticipation", "Aversion", "Confidence", "Disapproval",
    "Disconnection", "Disquietment", "Doubt/Confusion", "Embarrassment", "Engagement", "Esteem",
    "Excitement", "Fatigue", "Fear", "Happiness", "Pain", "Peace", "Pleasure", "Sadness",
    "Sensitivity", "Suffering", "Surprise", "Sympathy", "Yearning")

SPLIT_TREE_INSTRUCTIONS = """Download the authors' split folders (chincharles/u-emo README,
"Preparing Datasets") and unpack them so that --manual_dir holds {train,val,test}/<class>/<images>.
Optional, beside them: person_boxes.json ({"train/<class>/<file>": [x1, y1, x2, y2] or null})
and attributes.json (EmoSet-style attributes per image)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  description: str
  classes: Tuple[str, ...]          # in label order
  source: str = "split_tree"        # the conversion's --source for its release
  multi_label: bool = False
  # (train, val, test) fractions per class of the authors' seeded split of raw class folders
  # (`--source class_folders --recipe NAME`); None where the release is already split.
  recipe: Optional[Tuple[float, float, float]] = None
  # The training split's size as the authors' splits give it (approximate: published image
  # counts x the split fraction; EMOTIC: annotated persons), and the global fine-tuning batch
  # that gives it at least 20 optimizer steps per epoch.
  train_images: int = 0
  batch_size: int = 1024
  manual_instructions: str = SPLIT_TREE_INSTRUCTIONS

  @property
  def num_classes(self) -> int:
    return len(self.classes)


CATALOGUE: Dict[str, Dataset] = {d.name: d for d in (
    Dataset("emo8", "Emo8 (the UniEmoX authors' dataset): 8 Mikels emotions, their 8:1:1 "
            "split.", MIKELS, recipe=(0.80, 0.10, 0.10), train_images=7144, batch_size=256),
    Dataset("fi", "FI (Flickr & Instagram): 8 Mikels emotions, the authors' 80/5/15 split.",
            MIKELS, recipe=(0.80, 0.05, 0.15), train_images=18646, batch_size=512),
    Dataset("emotion6", "Emotion6: 6 Ekman emotions, the authors' 70/10/20 split.",
            ("anger", "disgust", "fear", "joy", "sadness", "surprise"),
            recipe=(0.70, 0.10, 0.20), train_images=1386, batch_size=64),
    Dataset("ube", "UnbiasedEmo: 6 emotions, the authors' 70/10/20 split.",
            ("anger", "fear", "joy", "love", "sadness", "surprise"),
            recipe=(0.70, 0.10, 0.20), train_images=2131, batch_size=64),
    Dataset("heco", "HECO: 8 emotions, the authors' 70/10/20 split.",
            ("anger", "disgust", "excitement", "fear", "happiness", "peace", "sadness",
             "surprise"), recipe=(0.70, 0.10, 0.20), train_images=6570, batch_size=256),
    Dataset("caer_s", "CAER-S: 7 emotions; train as released, test split 66% test / 34% val "
            "by the authors.", ("anger", "disgust", "fear", "happy", "neutral", "sad",
                                "surprise"), train_images=44996, batch_size=1024),
    Dataset("emoset", "EmoSet-118K: 8 Mikels emotions in EmoSet's index order, with its "
            "attributes.", EMOSET_CLASSES, source="emoset", train_images=94481,
            batch_size=1024, manual_instructions="""Request EmoSet-118K from its authors and
unpack it so that --manual_dir holds train.json, val.json, test.json, image/ and annotation/
(the release's layout)."""),
    Dataset("emotic", "EMOTIC: one example per annotated person, 26 categories "
            "(multi-label), its body box.", EMOTIC_CLASSES, source="emotic", multi_label=True,
            train_images=23266, batch_size=1024, manual_instructions="""Request EMOTIC from its
authors and unpack it so that --manual_dir holds Annotations/Annotations.mat and the image
folders it names (emotic/mscoco, emotic/framesdb, emotic/ade20k, emotic/emodb_small)."""),
)}

# CAER-S keeps its train split and divides its test split 66% test / 34% val.
CAER_S_TEST_FRACTION = 0.66


def get(name: str) -> Dataset:
  if name not in CATALOGUE:
    raise ValueError(f"dataset {name!r} is not in the catalogue ({sorted(CATALOGUE)})")
  return CATALOGUE[name]

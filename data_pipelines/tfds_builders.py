r"""TensorFlow Datasets builders for the emotion benchmarks, on the conversion tool's code.

  python -m data_pipelines.tfds_builders emo8 --manual_dir /data/Emo8 --data_dir data/tfds
  # or, with TFDS's own CLI (which also needs apache-beam and mlcroissant installed, TFDS
  # issue 5463):
  tfds build emo8 --imports data_pipelines.tfds_builders --manual_dir /data/Emo8 \
      --data_dir data/tfds
  # then our pipelines read data/tfds/emo8/1.0.0, and so does
  tfds.load("emo8", data_dir="data/tfds")   # after `import data_pipelines.tfds_builders`

None of the datasets can be downloaded automatically; each builder's
MANUAL_DOWNLOAD_INSTRUCTIONS says what to put in --manual_dir. The builders read the manual
folder with the same sources (`data_pipelines.sources`, plus `person_boxes.json` /
`attributes.json` side files when present) and make each record with the same function
(`convert.make_record`) as `python -m data_pipelines.convert`, so a dataset built either way
holds the same examples (TFDS orders and shards them its own way). An unreadable image is
logged and skipped, as the CLI reports and skips it.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from absl import logging
import tensorflow_datasets as tfds

from data_pipelines import convert
from data_pipelines import sources
from data_pipelines import tfds_format

_SPLIT_TREE = """Download the authors' split folders (chincharles/u-emo README, "Preparing
Datasets") and unpack them so that --manual_dir holds {train,val,test}/<class>/<images>.
Optional, beside them: person_boxes.json ({"train/<class>/<file>": [x1, y1, x2, y2] or null})
and attributes.json (EmoSet-style attributes per image)."""

_CITATION = """@article{UniEmoX2024, title={UniEmoX: Cross-modal Semantic-Guided Large-Scale
Pretraining for Universal Scene Emotion Perception}, author={Chuang Chen and Xiao Sun and Zhi
Liu}, journal={arXiv preprint arXiv:2409.18877}, year={2024}}"""

MIKELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear",
          "sadness")   # alphabetical: the class-folder order


class EmotionDataset(tfds.core.GeneratorBasedBuilder):
  """Base: subclasses set CLASSES (in label order), SOURCE and the instructions."""
  VERSION = tfds.core.Version(tfds_format.DEFAULT_VERSION)
  RELEASE_NOTES = {tfds_format.DEFAULT_VERSION: "The uniemox-jax record schema."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _SPLIT_TREE
  CLASSES: Sequence[str] = ()
  SOURCE = "split_tree"        # a --source of data_pipelines.convert
  MULTI_LABEL = False
  HOMEPAGE = "https://arxiv.org/abs/2409.18877"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds_format.features(self.CLASSES, self.MULTI_LABEL),
        supervised_keys=("image", "labels" if self.MULTI_LABEL else "label"),
        homepage=self.HOMEPAGE, citation=_CITATION)

  def plan(self, manual_dir: str) -> sources.Plan:
    """The conversion tool's plan of the manual folder, its classes checked."""
    args = ["--source", self.SOURCE, "--root", manual_dir, "--name", self.name,
            "--out", os.devnull]
    for flag, name in (("--person_boxes", "person_boxes.json"),
                       ("--attributes", "attributes.json")):
      if os.path.exists(os.path.join(manual_dir, name)):
        args += [flag, os.path.join(manual_dir, name)]
    plan = convert.build_plan(convert.parse_args(args))
    found = [c.lower() for c in plan.class_names]
    if found != [c.lower() for c in self.CLASSES]:
      raise ValueError(f"{manual_dir}: the {self.name} builder expects the classes "
                       f"{list(self.CLASSES)} (in this order), the folder has "
                       f"{plan.class_names}")
    for problem in plan.problems:
      logging.warning("%s: %s", manual_dir, problem)
    return plan

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    plan = self.plan(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(plan, split) for split in plan.splits()}

  def _generate_examples(self, plan: sources.Plan, split: str):
    for e in plan.entries:
      if e.split != split:
        continue
      try:
        rec, box_dropped, _ = convert.make_record(e, convert.entry_prompt(plan, e))
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("skipping unreadable image %s: %s: %s", e.path, type(err).__name__,
                        err)
        continue
      if box_dropped:
        logging.warning("%s: its person box is empty inside the image; whole image used",
                        e.rel_path)
      # The stored forms (bytes, relative box, JSON attributes) are what TFDS encodes.
      yield rec.image_id, rec.features()


class Emo8(EmotionDataset):
  """Emo8 (the UniEmoX authors' dataset): 8 Mikels emotions, their 8:1:1 split."""
  CLASSES = MIKELS


class Fi(EmotionDataset):
  """FI (Flickr & Instagram): 8 Mikels emotions, the authors' 80/5/15 split."""
  CLASSES = MIKELS


class Emotion6(EmotionDataset):
  """Emotion6: 6 Ekman emotions, the authors' 70/10/20 split."""
  CLASSES = ("anger", "disgust", "fear", "joy", "sadness", "surprise")


class Ube(EmotionDataset):
  """UnbiasedEmo: 6 emotions, the authors' 70/10/20 split."""
  CLASSES = ("anger", "fear", "joy", "love", "sadness", "surprise")


class Heco(EmotionDataset):
  """HECO: 8 emotions, the authors' 70/10/20 split."""
  CLASSES = ("anger", "disgust", "excitement", "fear", "happiness", "peace", "sadness",
             "surprise")


class CaerS(EmotionDataset):
  """CAER-S: 7 emotions; train as released, test split 66% test / 34% val by the authors."""
  CLASSES = ("anger", "disgust", "fear", "happy", "neutral", "sad", "surprise")


class Emoset(EmotionDataset):
  """EmoSet-118K: 8 Mikels emotions in EmoSet's index order, with its attributes."""
  CLASSES = sources.EMOSET_CLASSES
  SOURCE = "emoset"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Request EmoSet-118K from its authors and unpack it so that
--manual_dir holds train.json, val.json, test.json, image/ and annotation/ (the release's
layout)."""


class Emotic(EmotionDataset):
  """EMOTIC: one example per annotated person, 26 categories (multi-label), its body box."""
  CLASSES = sources.EMOTIC_CLASSES
  SOURCE = "emotic"
  MULTI_LABEL = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Request EMOTIC from its authors and unpack it so that
--manual_dir holds Annotations/Annotations.mat and the image folders it names
(emotic/mscoco, emotic/framesdb, emotic/ade20k, emotic/emodb_small)."""


BUILDERS = {b.name: b for b in (Emo8, Fi, Emotion6, Ube, Heco, CaerS, Emoset, Emotic)}


def build(name: str, manual_dir: str, data_dir: str, version: Optional[str] = None) -> str:
  """`tfds build` in Python: prepares <data_dir>/<name>/<version>/; returns that folder."""
  builder = BUILDERS[name](data_dir=data_dir, version=version)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return os.fspath(builder.data_dir)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description="Build a TFDS emotion dataset from manual files "
                              "(what `tfds build` does for these builders).")
  p.add_argument("dataset", choices=sorted(BUILDERS))
  p.add_argument("--manual_dir", required=True, help="the files the builder's "
                 "MANUAL_DOWNLOAD_INSTRUCTIONS describe")
  p.add_argument("--data_dir", required=True, help="TFDS data dir: writes <name>/<version>/")
  p.add_argument("--list_classes", action="store_true", help="print each builder's classes")
  args = p.parse_args(argv)
  if args.list_classes:
    print(json.dumps({name: list(b.CLASSES) for name, b in BUILDERS.items()}, indent=1))
    return 0
  if not os.path.isdir(args.manual_dir):
    raise FileNotFoundError(f"--manual_dir {args.manual_dir} does not exist:\n"
                            f"{BUILDERS[args.dataset].MANUAL_DOWNLOAD_INSTRUCTIONS}")
  print(build(args.dataset, args.manual_dir, args.data_dir))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

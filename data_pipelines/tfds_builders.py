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
(`convert.make_record`) as `python -m uniemox_jax.tools.convert`, so a dataset built either way
holds the same examples (TFDS orders and shards them its own way). An unreadable image is
logged and skipped, as the CLI reports and skips it.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from absl import logging
import tensorflow_datasets as tfds

from data_pipelines import catalogue
from data_pipelines import convert
from data_pipelines import sources
from data_pipelines import tfds_format

_CITATION = """@article{UniEmoX2024, title={UniEmoX: Cross-modal Semantic-Guided Large-Scale
Pretraining for Universal Scene Emotion Perception}, author={Chuang Chen and Xiao Sun and Zhi
Liu}, journal={arXiv preprint arXiv:2409.18877}, year={2024}}"""

class EmotionDataset(tfds.core.GeneratorBasedBuilder):
  """Base: subclasses set CLASSES (in label order), SOURCE and the instructions."""
  VERSION = tfds.core.Version(tfds_format.DEFAULT_VERSION)
  RELEASE_NOTES = {tfds_format.DEFAULT_VERSION: "The uniemox-jax record schema."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = catalogue.SPLIT_TREE_INSTRUCTIONS
  CLASSES: Sequence[str] = ()
  SOURCE = "split_tree"        # a --source of the conversion (data_pipelines.convert)
  MULTI_LABEL = False
  HOMEPAGE = "https://arxiv.org/abs/2409.18877"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds_format.features(self.CLASSES, self.MULTI_LABEL),
        supervised_keys=("image", "labels" if self.MULTI_LABEL else "label"),
        homepage=self.HOMEPAGE, citation=_CITATION)

  def plan(self, manual_dir: str) -> sources.Plan:
    """The conversion tool's plan of the manual folder, its classes checked."""
    plan = convert.build_plan(self.SOURCE, self.name, manual_dir)
    side = [os.path.join(manual_dir, name) for name in ("person_boxes.json", "attributes.json")]
    sources.apply_side_files(plan, *(convert.read_side_file(path, path) if os.path.exists(path)
                                     else None for path in side))
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


def _builder(entry: catalogue.Dataset) -> type:
  """The builder class of one catalogue entry, named as TFDS names it back: "caer_s" ->
  CaerS -> "caer_s"."""
  cls_name = "".join(part[:1].upper() + part[1:] for part in entry.name.split("_"))
  return type(cls_name, (EmotionDataset,), {
      "__doc__": entry.description, "__module__": __name__, "CLASSES": entry.classes,
      "SOURCE": entry.source, "MULTI_LABEL": entry.multi_label,
      "MANUAL_DOWNLOAD_INSTRUCTIONS": entry.manual_instructions})


# One builder per catalogue entry, registered with TFDS as the module is imported.
BUILDERS = {}
for _entry in catalogue.CATALOGUE.values():
  _cls = _builder(_entry)
  if _cls.name != _entry.name:
    raise RuntimeError(f"TFDS names the builder {_cls.__name__} {_cls.name!r}, not "
                       f"{_entry.name!r}")
  BUILDERS[_entry.name] = globals()[_cls.__name__] = _cls


def build(name: str, manual_dir: str, data_dir: str, version: Optional[str] = None) -> str:
  """`tfds build` in Python: prepares <data_dir>/<name>/<version>/; returns that folder."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    # TFDS writes its shards with TensorFlow; our converter does not need it.
    raise ImportError(
        f"building {name!r} with TFDS needs TensorFlow ({e}): pip install -e '.[tfds]', or "
        f"convert without it: python -m uniemox_jax.tools.convert --source split_tree "
        f"--root {manual_dir} --name {name} --out <folder>") from e
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

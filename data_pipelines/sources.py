"""Dataset sources: each turns a dataset on disk into a `Plan` (the entries to convert).

  split_tree     <root>/{train,val,test}/<class>/*   (Emo8, FI, Emotion6, UBE, HECO, CAER-S as
                 the authors publish them)
  class_folders  <root>/<class>/* split by a seeded, stratified recipe (docs/method.md §5);
                 the split is written as a manifest that later runs can reuse
  emoset         EmoSet-118K: {train,val,test}.json lists of [emotion, image_id, image_path,
                 annotation_path] (the release) or [emotion, image_path, annotation_path] (the
                 reference code's), info.json's class map, per-image annotation JSONs
  emotic         EMOTIC: Annotations/Annotations.mat, 26 categories, multi-label, person boxes

Labels of folder datasets are the alphabetical index of the class folder; EmoSet keeps its own
order (the Mikels eight, `EMOSET_CLASSES`). A class folder's images may sit in sub-folders of
it (UBE ships them so). Structural problems (a class missing from one split, an empty class)
are collected in `Plan.problems`, and files that are not images by name in `Plan.skipped`,
for the conversion report.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from data_pipelines import catalogue
from data_pipelines import images
from data_pipelines import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "val", "test")
# Split names as other layouts spell them (the hub's `validation`, a table's `dev`) -> ours.
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "val", "valid": "val",
                 "val": "val", "dev": "val", "test": "test", "testing": "test"}


def our_split(name: str) -> str:
  """A split as another layout names it, in our names (`validation` -> val); others as given,
  lower-cased."""
  return SPLIT_ALIASES.get(name.strip().lower(), name.strip().lower())
# Class lists and split recipes: the dataset catalogue's (data_pipelines/catalogue.py).
EMOSET_CLASSES = catalogue.EMOSET_CLASSES
EMOTIC_CLASSES = catalogue.EMOTIC_CLASSES
# Seeded split recipes of docs/method.md §5: (train, val, test) fractions per class.
RECIPES = {d.name: d.recipe for d in catalogue.CATALOGUE.values() if d.recipe}
CAER_S_TEST_FRACTION = catalogue.CAER_S_TEST_FRACTION


@dataclasses.dataclass
class Entry:
  split: str
  path: str                       # absolute path of the image file
  rel_path: str                   # path relative to the dataset root (the stable id)
  label: int                      # -1 for multi-label entries
  label_name: str
  attributes: Dict[str, Any] = dataclasses.field(default_factory=dict)
  box_xyxy: Optional[Tuple[float, float, float, float]] = None  # person box, pixels
  labels: Optional[List[int]] = None                             # multi-hot
  # An image inside a table (a Hugging Face parquet or arrow file at `path`): its row and
  # column there (data_pipelines/hf_datasets.py reads it); None for an image file.
  row: Optional[int] = None
  column: str = ""


@dataclasses.dataclass
class Plan:
  name: str
  class_names: List[str]
  entries: List[Entry]
  multi_label: bool = False
  problems: List[str] = dataclasses.field(default_factory=list)
  manifest: Optional[Dict[str, List[str]]] = None   # class_folders: the split it drew
  # Files found under the root and not converted: {"path", "reason"} (reasons in words).
  skipped: List[Dict[str, str]] = dataclasses.field(default_factory=list)
  system_files: int = 0                             # .DS_Store, Thumbs.db, ...: ignored
  empty_classes: List[str] = dataclasses.field(default_factory=list)   # "class (split)"
  layout: str = ""                # which of a source's layouts was read, for the report

  def splits(self) -> List[str]:
    return [s for s in SPLITS if any(e.split == s for e in self.entries)] + sorted(
        {e.split for e in self.entries} - set(SPLITS))


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk(root: str, rel_dir: str, plan: "Plan") -> List[str]:
  """Image files under `root/rel_dir`, sub-folders included (UBE's raw classes hold folders
  of images), as sorted paths relative to `root`. Files that are not images by name are
  listed in `plan.skipped`; an OS's clutter (.DS_Store, Thumbs.db, ._*) is only counted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, rel_dir)):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      if images.is_system_file(name):
        plan.system_files += 1
      elif _is_image(name):
        found.append(rel)
      else:
        ext = os.path.splitext(name)[1] or "none"
        plan.skipped.append({"path": rel, "reason": "not an image file name (extension "
                             f"{ext}); not converted"})
  return sorted(found)


def _class_dirs(folder: str) -> List[str]:
  return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                and not d.startswith("."))


def require_dir(path: str, flag: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{flag} {path} is not a directory")


def split_tree(root: str, name: str, splits: Sequence[str] = SPLITS) -> Plan:
  require_dir(root, "--root")
  present = [s for s in splits if os.path.isdir(os.path.join(root, s))]
  if not present:
    raise FileNotFoundError(f"--root {root} has none of the split folders {list(splits)}")
  per_split = {s: _class_dirs(os.path.join(root, s)) for s in present}
  classes = sorted(set().union(*per_split.values()))
  if not classes:
    raise FileNotFoundError(f"--root {root}: the split folders {present} hold no class "
                            "folders (expected <split>/<class>/<images>)")
  plan = Plan(name, classes, [])
  for split in present:
    for f in sorted(os.listdir(os.path.join(root, split))):
      if os.path.isfile(os.path.join(root, split, f)) and not images.is_system_file(f):
        plan.skipped.append({"path": os.path.join(split, f), "reason": "a file directly in a "
                             "split folder, outside every class folder; not converted"})
    for cls in classes:
      if cls not in per_split[split]:
        plan.problems.append(f"class {cls!r} has no folder in split {split!r}")
        continue
      files = _walk(root, os.path.join(split, cls), plan)
      if not files:
        plan.problems.append(f"class {cls!r} is empty in split {split!r}")
        plan.empty_classes.append(f"{cls} ({split})")
      for rel in files:
        plan.entries.append(Entry(split, os.path.join(root, rel), rel, classes.index(cls), cls))
  return plan


def draw_split(files: List[str], fractions: Sequence[float], rng: np.random.Generator,
                names: Sequence[str]) -> Dict[str, List[str]]:
  order = [files[i] for i in rng.permutation(len(files))]
  counts = [int(round(len(files) * f)) for f in fractions[:-1]]
  out, start = {}, 0
  for split, n in zip(names[:-1], counts):
    out[split] = order[start:start + n]
    start += n
  out[names[-1]] = order[start:]
  return out


def split_fractions(recipe: str, fractions: Sequence[float], unknown: str) -> Sequence[float]:
  """The (train, val, test) fractions of a drawn split: `fractions`, else `recipe`'s (`unknown`
  is the error when it has none), checked."""
  if not fractions:
    if recipe not in RECIPES:
      raise ValueError(unknown)
    fractions = RECIPES[recipe]
  if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
    raise ValueError(f"--split_fractions {list(fractions)} must be three non-negative "
                     "fractions (train, val, test) summing to 1")
  return fractions


def class_folders(root: str, name: str, recipe: str = "", fractions: Sequence[float] = (),
                  seed: int = 0, manifest: Optional[Mapping[str, List[str]]] = None) -> Plan:
  """A seeded stratified split of `<root>/<class>/*` (or, with recipe "caer_s", of CAER-S's
  `<root>/test/<class>/*` into test/val, keeping `<root>/train`). With `manifest` (a previous
  run's {split: [relative paths]}), that split is reused exactly instead of drawn."""
  require_dir(root, "--root")
  if recipe == "caer_s":
    plan = split_tree(root, name, ("train", "test"))
    if manifest is None:
      by_class = collections.defaultdict(list)
      for e in plan.entries:
        if e.split == "test":
          by_class[e.label_name].append(e.rel_path)
      rng = np.random.default_rng(seed)
      drawn = {"test": [], "val": []}
      for cls in sorted(by_class):
        part = draw_split(by_class[cls], (CAER_S_TEST_FRACTION, 1 - CAER_S_TEST_FRACTION),
                           rng, ("test", "val"))
        for split in drawn:
          drawn[split] += part[split]
      manifest = drawn
    moved = {p: s for s, paths in manifest.items() for p in paths}
    for e in plan.entries:
      if e.split == "test":
        e.split = moved.get(e.rel_path, "test")
    plan.manifest = {s: sorted(e.rel_path for e in plan.entries if e.split == s)
                     for s in plan.splits()}
    return plan

  if manifest is None:
    fractions = split_fractions(recipe, fractions, f"--recipe {recipe!r} is unknown; choose "
                                f"one of {sorted(RECIPES) + ['caer_s']} or give --split_fractions")
  classes = _class_dirs(root)
  if not classes:
    raise FileNotFoundError(f"--root {root} has no class folders")
  split_dirs = [c for c in classes if c.lower() in SPLITS + ("validation",)]
  if split_dirs:
    others = [c for c in classes if c not in split_dirs]
    raise ValueError(
        f"--root {root} holds the split folders {split_dirs}"
        + (f" beside the class folders {others}" if others else "")
        + ": a dataset already split into train/val/test is --source split_tree (point "
        "--root at the folder holding them); a raw root for --source class_folders holds "
        "only class folders")
  plan = Plan(name, classes, [])
  files_of = {}
  for cls in classes:
    files_of[cls] = _walk(root, cls, plan)
    if not files_of[cls]:
      plan.problems.append(f"class {cls!r} is empty")
      plan.empty_classes.append(cls)
  problems = plan.problems
  if manifest is None:
    rng = np.random.default_rng(seed)
    manifest = {s: [] for s in SPLITS}
    for cls in classes:
      for split, paths in draw_split(files_of[cls], fractions, rng, SPLITS).items():
        manifest[split] += paths
  known = {p for paths in files_of.values() for p in paths}
  entries = []
  for split, paths in manifest.items():
    for rel in paths:
      if rel not in known:
        problems.append(f"manifest lists {rel!r} ({split}), which is not under --root")
        continue
      cls = rel.split(os.sep)[0]
      entries.append(Entry(split, os.path.join(root, rel), rel, classes.index(cls), cls))
  listed = {p for paths in manifest.values() for p in paths}
  problems += [f"{p!r} is under --root but in no split of the manifest"
               for p in sorted(known - listed)]
  plan.entries = entries
  plan.manifest = {s: sorted(p) for s, p in manifest.items()}
  return plan


def emoset_attributes(annotation: Mapping[str, Any], where: str) -> Dict[str, Any]:
  """EmoSet annotation JSON -> our attribute keys (see prompts.ATTRIBUTES)."""
  if not isinstance(annotation, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(annotation).__name__}")
  out = {}
  for ours, theirs in (("scene", "scene"), ("objects", "object"), ("brightness", "brightness"),
                       ("colorfulness", "colorfulness"),
                       ("facial_expression", "facial_expression"),
                       ("human_action", "human_action")):
    value = annotation.get(theirs)
    if value is None:
      continue
    if ours in ("brightness", "colorfulness") and not isinstance(value, (int, float)):
      raise ValueError(f"{where}: field {theirs!r} should be a number, got {value!r}")
    if ours == "objects" and not isinstance(value, (list, str)):
      raise ValueError(f"{where}: field 'object' should be a list of names, got {value!r}")
    out[ours] = value
  return out


# EmoSet's two list forms: the official release's rows, and the rows the UniEmoX reference
# code reads (its datasets/build_dataset.py), each with its class map's place in info.json.
EMOSET_FORMS = {
    4: ("the official EmoSet-118K release ([emotion, image_id, image_path, annotation_path] "
        "rows)", ("emotion", "label2idx")),
    3: ("the UniEmoX reference code's EmoSet ([emotion, image_path, annotation_path] rows)",
        ("label2idx",)),
}


def _emoset_form(list_path: str, items: Any) -> int:
  """The form (its row length, a key of EMOSET_FORMS) of one split list; refuses others."""
  if not isinstance(items, list):
    raise ValueError(f"EmoSet split list {list_path} should be a JSON list")
  form = 0
  for i, item in enumerate(items):
    if not (isinstance(item, (list, tuple)) and len(item) in EMOSET_FORMS and
            all(isinstance(x, str) for x in item) and len(item) == (form or len(item))):
      raise ValueError(f"{list_path} entry {i}: expected [emotion, image_id, image_path, "
                       "annotation_path] (EmoSet's release) or [emotion, image_path, "
                       f"annotation_path] (the reference code's), one form per list; got "
                       f"{item!r}")
    form = len(item)
  return form or 4


def _emoset_classes(root: str, form: int, plan: "Plan") -> List[str]:
  """The class order of info.json's label2idx where the form keeps it, else EmoSet's."""
  path = os.path.join(root, "info.json")
  keys = EMOSET_FORMS[form][1]
  if not os.path.exists(path):
    return list(EMOSET_CLASSES)
  node = storage.read_json(path, "EmoSet info")
  for key in keys:
    node = node.get(key) if isinstance(node, dict) else None
  where = f"{path} " + "".join(f"[{k!r}]" for k in keys)
  if node is None:
    raise ValueError(f"{where} is missing: the class map of {EMOSET_FORMS[form][0]}")
  if not (isinstance(node, dict) and sorted(node.values()) == list(range(len(node)))):
    raise ValueError(f"{where} should map each emotion to 0..N-1, got {node!r}")
  names = sorted(node, key=node.get)
  if set(names) != set(EMOSET_CLASSES):
    raise ValueError(f"{where} names {names}; EmoSet's emotions are {list(EMOSET_CLASSES)}")
  if names != list(EMOSET_CLASSES):
    plan.problems.append(f"{where} orders the classes {names}, not as EmoSet publishes them "
                         f"({list(EMOSET_CLASSES)}); its order is kept")
  return names


def emoset(root: str, name: str = "emoset", splits: Sequence[str] = SPLITS) -> Plan:
  """EmoSet-118K: `<root>/<split>.json` lists [emotion, image_id, image_path, annotation_path]
  (the official release) or [emotion, image_path, annotation_path] (what the reference code
  reads), paths relative to root; the form is detected and named in `Plan.layout`. Labels
  follow info.json's label2idx (`info["emotion"]` in the release, top level in the
  reference's), else EmoSet's order; each annotation JSON carries the image's attributes."""
  require_dir(root, "--root")
  plan = Plan(name, [], [])
  lists = {}
  for split in splits:
    list_path = os.path.join(root, f"{split}.json")
    if not os.path.exists(list_path):
      plan.problems.append(f"EmoSet split list {list_path} is missing; split {split!r} skipped")
      continue
    items = storage.read_json(list_path, "EmoSet split list")
    lists[split] = (list_path, items, _emoset_form(list_path, items))
  if not lists:
    raise FileNotFoundError(f"--root {root} has no EmoSet split list ({', '.join(splits)}"
                            ".json)")
  forms = {form for _, _, form in lists.values()}
  if len(forms) > 1:
    raise ValueError(f"--root {root}: the split lists mix EmoSet's forms: " + "; ".join(
        f"{p}: {EMOSET_FORMS[f][0]}" for p, _, f in lists.values()))
  form = forms.pop()
  plan.class_names = _emoset_classes(root, form, plan)
  plan.layout = EMOSET_FORMS[form][0] + (
      f", classes from info.json{''.join(f'[{k!r}]' for k in EMOSET_FORMS[form][1])}"
      if os.path.exists(os.path.join(root, "info.json")) else ", no info.json: EmoSet's order")
  for split, (list_path, items, _) in lists.items():
    for i, item in enumerate(items):
      where = f"{list_path} entry {i}"
      if form == 4:
        emotion, image_id, image_rel, ann_rel = item
      else:
        (emotion, image_rel, ann_rel), image_id = item, None
      if emotion not in plan.class_names:
        raise ValueError(f"{where}: unknown emotion {emotion!r}; EmoSet's are "
                         f"{plan.class_names}")
      ann_path = os.path.join(root, ann_rel)
      ann = storage.read_json(ann_path, "EmoSet annotation", where)
      attrs = emoset_attributes(ann, f"{ann_path} ({where})")
      if ann.get("emotion", emotion) != emotion:
        raise ValueError(f"{ann_path} ({where}): its emotion {ann['emotion']!r} differs from "
                         f"the split list's {emotion!r}")
      if image_id is not None and ann.get("image_id", image_id) != image_id:
        raise ValueError(f"{ann_path} ({where}): its image_id {ann['image_id']!r} differs "
                         f"from the split list's {image_id!r}")
      plan.entries.append(Entry(split, os.path.join(root, image_rel), image_rel,
                                plan.class_names.index(emotion), emotion, attrs))
  return plan


def _as_list(value) -> list:
  """A MATLAB array read with squeeze_me: one element comes back bare, several as an array."""
  if isinstance(value, np.ndarray):
    return list(value.reshape(-1))
  return [value]


def _emotic_categories(person, split: str, where: str) -> List[str]:
  # Train has one annotator (annotations_categories.categories); val and test carry the
  # annotators' union in combined_categories.
  field = "annotations_categories" if split == "train" else "combined_categories"
  value = getattr(person, field, None)
  if value is None:
    raise ValueError(f"{where}: person has no field {field!r}")
  if split == "train":
    value = getattr(value, "categories", None)
  cats = [str(c) for c in _as_list(value) if str(c).strip()]
  unknown = [c for c in cats if c not in EMOTIC_CLASSES]
  if unknown:
    raise ValueError(f"{where}: unknown categories {unknown}; EMOTIC's 26 are "
                     f"{list(EMOTIC_CLASSES)}")
  return cats


def emotic(root: str, name: str = "emotic", splits: Sequence[str] = SPLITS) -> Plan:
  """EMOTIC, one record per annotated person, from the official `Annotations/Annotations.mat`
  (structs per split with filename, folder and person[] with body_bbox [x1 y1 x2 y2] and the
  categories); images at `<root>/emotic/<folder>/<filename>`. People without categories are
  reported and left out."""
  from scipy import io as sio  # pylint: disable=g-import-not-at-top
  require_dir(root, "--root")
  path = os.path.join(root, "Annotations", "Annotations.mat")
  if not os.path.exists(path):
    raise FileNotFoundError(f"EMOTIC annotations {path} do not exist")
  try:
    mat = sio.loadmat(path, squeeze_me=True, struct_as_record=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"EMOTIC annotations {path} cannot be read: {e}") from None
  entries, problems = [], []
  for split in splits:
    if split not in mat:
      problems.append(f"{path} has no {split!r} annotations; split skipped")
      continue
    for i, image in enumerate(_as_list(mat[split])):
      where = f"{path} {split}[{i}]"
      try:
        rel = os.path.join(str(image.folder), str(image.filename))
        people = _as_list(image.person)
      except AttributeError as e:
        raise ValueError(f"{where}: malformed image entry ({e})") from None
      for j, person in enumerate(people):
        pwhere = f"{where} person {j}"
        box = [float(v) for v in np.asarray(getattr(person, "body_bbox", [])).reshape(-1)]
        if len(box) != 4:
          raise ValueError(f"{pwhere}: body_bbox is not [x1, y1, x2, y2]")
        cats = _emotic_categories(person, split, pwhere)
        if not cats:
          problems.append(f"{pwhere} ({rel}) has no category; left out")
          continue
        multi_hot = [int(c in cats) for c in EMOTIC_CLASSES]
        entries.append(Entry(split, os.path.join(root, "emotic", rel), f"{rel}#person{j}",
                             -1, "", {}, tuple(box), multi_hot))
  if not entries:
    raise FileNotFoundError(f"{path} yielded no annotated person for splits {list(splits)}")
  return Plan(name, list(EMOTIC_CLASSES), entries, multi_label=True, problems=problems)


def apply_side_files(plan: Plan, boxes: Optional[Mapping[str, Any]],
                     attributes: Optional[Mapping[str, Any]]) -> None:
  """Attaches person boxes ({relative path: [x1, y1, x2, y2] pixels or null}) and attributes
  ({relative path: {...}}) from side files. A dataset's own boxes (EMOTIC) are kept."""
  for e in plan.entries:
    key = e.rel_path.split("#")[0]
    if boxes is not None and e.box_xyxy is None:
      box = boxes.get(key)
      if box is not None:
        if len(box) != 4:
          raise ValueError(f"--person_boxes: the box of {key!r} is not [x1, y1, x2, y2]")
        e.box_xyxy = tuple(float(v) for v in box)
    if attributes is not None and key in attributes:
      e.attributes = {**attributes[key], **e.attributes}

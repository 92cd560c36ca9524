"""grain pipelines over converted shards: pretraining, fine-tuning and evaluation.

Data flow: `ShardSource` (random access through the shard indexes, CRC-checked) -> global
seeded shuffle -> repeat -> this process's slice -> per-record decode and augment (seeded by
record index) -> batches of this process's share. Everything before the iterator is a
`grain.MapDataset`, so an iterator's state is a position and resume is exact; `make_iterator`
adds `mp_prefetch` worker processes. Images leave as uint8; see `uniemox_jax.augment` for
what happens on device. TensorFlow is never imported.

`process_index` / `process_count` are arguments (the trainer passes `jax.process_index()` and
`jax.process_count()`), so this module needs no JAX.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import flags
import grain
import numpy as np

from data_pipelines import dataset_info
from data_pipelines import records
from data_pipelines import tfrecord
from data_pipelines import transforms
from data_pipelines import verify

PERSON_VIEWS = ("box", "second_view")


def split_shards(data_dir: str, split: str,
                 info: Optional[dataset_info.DatasetInfo] = None) -> List[str]:
  """Shard paths of one split, or several joined by '+' (e.g. "train+val"), after the cheap
  checks of `verify.check_split` (sizes, record counts, each shard's split)."""
  info = info or dataset_info.DatasetInfo.load(data_dir)
  paths = []
  for part in split.split("+"):
    if part not in info.splits:
      raise ValueError(f"split {part!r} is not in {data_dir} (it has "
                       f"{sorted(info.splits)})")
    paths += verify.check_split(data_dir, info, part)
  return paths


class ShardSource:
  """grain random-access source: serialized records of one or more splits."""

  def __init__(self, data_dir: str, split: str):
    self.info = dataset_info.DatasetInfo.load(data_dir)
    self.split = split
    self._reader = tfrecord.RandomAccessReader(
        split_shards(data_dir, split, self.info),
        scan_if_missing=self.info.source == "tfds")

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, index: int) -> bytes:
    return self._reader[index]

  def __repr__(self) -> str:
    return f"ShardSource({self.split}, {len(self)} records)"


@dataclasses.dataclass(frozen=True)
class TrainSubset:
  """A seeded, stratified fraction of a training split (config.data.train_fraction, the
  reference's --split_ratio): `indices` (sorted record positions in the split) and, per class
  name, how many records were kept of how many."""
  fraction: float
  seed: int
  indices: np.ndarray
  per_class: Dict[str, Tuple[int, int]]

  def summary(self) -> Dict[str, Any]:
    return {"fraction": self.fraction, "seed": self.seed, "records": int(len(self.indices)),
            "of": sum(n for _, n in self.per_class.values()),
            "per_class": {c: {"kept": k, "of": n} for c, (k, n) in self.per_class.items()}}


def train_subset(data_dir: str, split: str, fraction: float, seed: int) -> TrainSubset:
  """Keeps round(fraction x n) records of each class of `split` (at least one), drawn with
  `seed` from the records' own labels: the same records on any number of processes (the
  subset is chosen before the split over processes). Multi-label records (label -1) form one
  group. Reads every record of the split once."""
  if not 0 < fraction <= 1:
    raise ValueError(f"config.data.train_fraction={fraction} must be in (0, 1]")
  source = ShardSource(data_dir, split)
  labels = np.array([records.parse(source[i])["label"] for i in range(len(source))], np.int64)
  names = list(source.info.class_names)
  rng = np.random.default_rng(seed)
  kept, per_class = [], {}
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    k = max(1, int(round(fraction * len(members))))
    kept.append(rng.permutation(members)[:k])
    per_class["(multi-label)" if label < 0 else names[label]] = (k, len(members))
  return TrainSubset(fraction, seed, np.sort(np.concatenate(kept)), per_class)


class _Subset:
  """The records of `source` at `indices`, as a grain random-access source."""

  def __init__(self, source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> bytes:
    return self._source[int(self._indices[index])]

  def __repr__(self) -> str:
    return (f"ShardSource({self._source.split}, {len(self)} of {len(self._source)} records "
            "by config.data.train_fraction)")


def _labels(rec: Dict[str, Any]) -> Dict[str, np.ndarray]:
  out = {"label": np.int32(rec["label"])}
  if "labels" in rec:
    out["labels"] = rec["labels"].astype(np.float32)
  return out


class PretrainTransform(grain.transforms.RandomMap):
  """Scene view: RandomResizedCrop(scale 0.2-1, bicubic) + flip. Person view: the stored person
  box cropped and resized (the whole image when there is none), or with
  person_view="second_view" an independent second scene-style view (the reference code)."""

  def __init__(self, image_size: int, person_view: str = "box",
               scale=(0.2, 1.0), tokenize: Optional[Callable[[str], Dict]] = None,
               draft: bool = True):
    """`tokenize` (prompt -> {"input_ids", "attention_mask"}) supplies tokens for datasets
    converted without text embeddings; the teacher's text tower then embeds them on device.
    `draft`: decode JPEGs at a reduced scale when both crops allow it (see
    `transforms.decode_for_boxes`)."""
    if person_view not in PERSON_VIEWS:
      raise ValueError(f"config.data.person_view={person_view!r}: choose one of {PERSON_VIEWS}")
    self.image_size, self.person_view, self.scale = image_size, person_view, scale
    self.tokenize, self.draft = tokenize, draft

  def random_map(self, data: bytes, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    rec = records.parse(data)
    img = transforms.open_lazy(rec["image"])
    # Boxes are drawn on the stored size first (the same draws as a full decode), then the
    # image is decoded just finely enough for both crops.
    scene_box = transforms.random_resized_crop_box(*img.size, rng, self.scale)
    scene_flip = rng.random() < 0.5
    person_flip = False
    if self.person_view == "second_view":
      person_box = transforms.random_resized_crop_box(*img.size, rng, self.scale)
      person_flip = rng.random() < 0.5
    else:
      person_box = transforms.person_box_pixels(img.size, rec["person_box"])
    img, (scene_box, person_box) = transforms.decode_for_boxes(
        img, [scene_box, person_box], self.image_size, self.draft)
    out = {"scene": transforms.to_array(transforms.crop_resize(img, scene_box, self.image_size),
                                        flip=scene_flip),
           "person": transforms.to_array(
               transforms.crop_resize(img, person_box, self.image_size), flip=person_flip),
           **_labels(rec), "has_person": np.int32(rec["has_person"])}
    if "text_emb" in rec:
      out["text_emb"] = rec["text_emb"]
    elif self.tokenize is not None:
      out.update({k: np.asarray(v, np.int32) for k, v in self.tokenize(rec["prompt"]).items()})
    return out


class FinetuneTransform(grain.transforms.RandomMap):
  """RandomResizedCrop(scale 0.08-1, bicubic), flip, RandAugment m9 mstd0.5 (the rest of the
  fine-tuning recipe - random erasing, mixup/cutmix, label smoothing - runs on device)."""

  def __init__(self, image_size: int, rand_augment: bool = True, scale=(0.08, 1.0),
               draft: bool = True):
    self.image_size, self.rand_augment, self.scale = image_size, rand_augment, scale
    self.draft = draft

  def random_map(self, data: bytes, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    rec = records.parse(data)
    img = transforms.open_lazy(rec["image"])
    box = transforms.random_resized_crop_box(*img.size, rng, self.scale)
    img, (box,) = transforms.decode_for_boxes(img, [box], self.image_size, self.draft)
    img = transforms.crop_resize(img, box, self.image_size)
    flip = rng.random() < 0.5
    if self.rand_augment:
      img = transforms.rand_augment(img, rng)
    return {"image": transforms.to_array(img, flip), **_labels(rec)}


class EvalTransform(grain.transforms.Map):
  """Resize the shorter side to `resize` (bicubic), center crop `image_size`. With
  `person_view`, also "person": the stored person box (or whole image) resized to
  `image_size`, as pretraining's person view (zero-shot reads both)."""

  def __init__(self, image_size: int, resize: Optional[int] = None, person_view: bool = False):
    self.image_size = image_size
    self.resize = resize or transforms.eval_resize(image_size)
    self.person_view = person_view

  def map(self, data: bytes) -> Dict[str, np.ndarray]:
    rec = records.parse(data)
    decoded = transforms.decode(rec["image"])
    img = transforms.resize_center_crop(decoded, self.resize, self.image_size)
    out = {"image": transforms.to_array(img), **_labels(rec), "mask": np.bool_(True)}
    if self.person_view:
      box = transforms.person_box_pixels(decoded, rec["person_box"])
      out["person"] = transforms.to_array(transforms.crop_resize(decoded, box, self.image_size))
    return out


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")


class _ProcessBlocks(grain.MapDataset):
  """This process's part of each global batch: element j is global element
  (j // local) * global + process_index * local + j % local."""

  def __init__(self, parent: grain.MapDataset, local_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._local, self._p, self._n = local_batch, process_index, process_count

  def __len__(self) -> int:
    return len(self._parent) // (self._local * self._n) * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    block, offset = divmod(index, self._local)
    return self._parent[block * self._local * self._n + self._p * self._local + offset]


def training_order(source, seed: int, num_epochs: Optional[int], local_batch: int,
                   process_index: int, process_count: int) -> grain.MapDataset:
  """Global seeded shuffle, reshuffled every epoch (grain seeds each epoch's permutation
  differently), repeated; then this process's contiguous share of every global batch. The
  global batch, its order and (with the transform applied before the split) its augmentation
  are the same on any number of processes: process p holds rows [p * local, (p + 1) * local)
  of the global batch, which is the order `jax.make_array_from_process_local_data` assembles."""
  _check_process(process_index, process_count)
  return grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)


def _train_dataset(source, transform, batch_size: int, seed: int, num_epochs: Optional[int],
                   process_index: int, process_count: int,
                   subset: Optional[TrainSubset] = None) -> grain.MapDataset:
  if subset is not None:
    source = _Subset(source, subset.indices)
  if len(source) < batch_size * process_count:
    raise ValueError(f"{source!r} has fewer records than one global batch "
                     f"({batch_size} x {process_count} processes)")
  ds = training_order(source, seed, num_epochs, batch_size, process_index, process_count)
  # Augmentation is seeded by the global position, before the per-process split.
  ds = ds.random_map(transform)
  ds = _ProcessBlocks(ds, batch_size, process_index, process_count)
  return ds.batch(batch_size, drop_remainder=True)


def pretrain_dataset(data_dir: str, split: str = "train", *, batch_size: int,
                     image_size: int = 224, person_view: str = "box", seed: int = 0,
                     num_epochs: Optional[int] = None, process_index: int = 0,
                     process_count: int = 1,
                     tokenize: Optional[Callable[[str], Dict]] = None,
                     draft_decode: bool = True,
                     subset: Optional[TrainSubset] = None) -> grain.MapDataset:
  """Batches of this process's `batch_size` pretraining examples: scene, person (uint8
  [B, S, S, 3]), text_emb (when converted with --text_embeddings; otherwise input_ids and
  attention_mask from `tokenize`, if given), label, has_person. With `subset`
  (`train_subset`), its records only."""
  transform = PretrainTransform(image_size, person_view, tokenize=tokenize, draft=draft_decode)
  return _train_dataset(ShardSource(data_dir, split), transform, batch_size, seed, num_epochs,
                        process_index, process_count, subset)


def finetune_dataset(data_dir: str, split: str = "train", *, batch_size: int,
                     image_size: int = 224, rand_augment: bool = True, seed: int = 0,
                     num_epochs: Optional[int] = None, process_index: int = 0,
                     process_count: int = 1, draft_decode: bool = True,
                     subset: Optional[TrainSubset] = None) -> grain.MapDataset:
  """Batches of image (uint8), label (and labels, multi-hot, for multi-label data); with
  `subset` (`train_subset`), of its records only."""
  transform = FinetuneTransform(image_size, rand_augment, draft=draft_decode)
  return _train_dataset(ShardSource(data_dir, split), transform, batch_size, seed, num_epochs,
                        process_index, process_count, subset)


def eval_dataset(data_dir: str, split: str = "test", *, batch_size: int,
                 image_size: int = 224, process_index: int = 0,
                 process_count: int = 1, person_view: bool = False) -> grain.MapDataset:
  """Every example exactly once over all processes: process p reads records p, p + P, ...;
  each process yields the same number of batches, the last ones padded with `mask` False
  (and `index`, the record's position in the split, -1)."""
  _check_process(process_index, process_count)
  source = ShardSource(data_dir, split)
  transform = EvalTransform(image_size, person_view=person_view)
  mine = grain.MapDataset.source(source)[process_index::process_count]
  per_process = -(-len(source) // process_count)
  total = max(1, -(-per_process // batch_size)) * batch_size
  padding = _padding_like(transform.map(source[0]))
  count = len(mine)

  def fetch(i: int):
    if i >= count:
      return padding
    return dict(transform.map(mine[i]), index=np.int64(process_index + i * process_count))
  return grain.MapDataset.range(total).map(fetch).batch(batch_size)


def _padding_like(example: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  pad = {k: np.zeros_like(v) for k, v in example.items()}
  pad["label"] = np.int32(-1)
  pad["index"] = np.int64(-1)
  pad["mask"] = np.bool_(False)
  return pad


def make_iterator(ds: grain.MapDataset, workers: int = 0, prefetch_per_worker: int = 2,
                  read_threads: int = 4, prefetch_batches: int = 4):
  """A checkpointable iterator (`get_state` / `set_state`), fed by `workers` processes, each
  (or this process, with no workers) preparing up to `prefetch_batches` batches ahead with
  `read_threads` threads. (grain's default read-ahead, 500 elements, means 500 *batches*
  here: gigabytes of images, decoded by threads that take the CPU from training.)"""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_batches))
  if workers > 0:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks,
    # benchmarks) they were never parsed, and the defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch_per_worker),
                              worker_init_fn=_ignore_interrupts)
  return iter(it_ds)


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
  """In each worker process: Ctrl-C reaches the whole process group, and the training process
  decides what it means (save and stop); a worker that died of it would end the run first."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)

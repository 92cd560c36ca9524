"""grain pipelines over converted shards: views, order, exactly-once eval, resume, errors."""
import functools
import json
import shutil

import grain
import numpy as np
import pytest

from data_pipelines import dataset_info
from data_pipelines import input_pipeline as ip
from data_pipelines import records
from data_pipelines import tfrecord
from data_pipelines import transforms


def _records(out, split="train"):
  src = ip.ShardSource(out, split)
  return [records.parse(src[i]) for i in range(len(src))]


def test_pretrain_batches_and_person_view(synthetic_data):
  _, out = synthetic_data
  ds = ip.pretrain_dataset(out, batch_size=4, image_size=32, num_epochs=1)
  batch = ds[0]
  assert batch["scene"].shape == batch["person"].shape == (4, 32, 32, 3)
  assert batch["scene"].dtype == np.uint8 and batch["label"].dtype == np.int32
  # The person view is exactly the stored box cropped and resized: check every record.
  transform = ip.PretrainTransform(32, "box")
  src = ip.ShardSource(out, "train")
  for i in range(len(src)):
    rec = records.parse(src[i])
    img = transforms.decode(rec["image"])
    expect = transforms.to_array(transforms.crop_resize(
        img, transforms.person_box_pixels(img, rec["person_box"]), 32))
    got = transform.random_map(src[i], np.random.default_rng(i))["person"]
    np.testing.assert_array_equal(got, expect)
    if not rec["has_person"]:     # no box: the whole image
      np.testing.assert_array_equal(got, transforms.to_array(img.resize((32, 32),
                                                                          transforms.BICUBIC)))


def test_second_view_is_a_random_scene_view(synthetic_data):
  _, out = synthetic_data
  src = ip.ShardSource(out, "train")
  a = ip.PretrainTransform(32, "second_view").random_map(src[0], np.random.default_rng(0))
  b = ip.PretrainTransform(32, "box").random_map(src[0], np.random.default_rng(0))
  np.testing.assert_array_equal(a["scene"], b["scene"])
  assert not np.array_equal(a["person"], b["person"])
  with pytest.raises(ValueError, match="config.data.person_view='crop'"):
    ip.PretrainTransform(32, "crop")


def test_seeded_and_deterministic(synthetic_data):
  _, out = synthetic_data
  a = ip.pretrain_dataset(out, batch_size=4, image_size=32, seed=1)
  b = ip.pretrain_dataset(out, batch_size=4, image_size=32, seed=1)
  c = ip.pretrain_dataset(out, batch_size=4, image_size=32, seed=2)
  np.testing.assert_array_equal(a[3]["scene"], b[3]["scene"])
  assert not np.array_equal(a[3]["scene"], c[3]["scene"])


def test_processes_split_each_global_batch_into_contiguous_blocks():
  n, local, procs = 24, 3, 2
  order = list(ip.training_order(list(range(n)), 0, 2, local, 0, procs))
  assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))
  assert order[:n] != list(range(n)) and order[:n] != order[n:]   # reshuffled each epoch
  parts = [ip._ProcessBlocks(grain.MapDataset.source(order), local, p, procs)
           for p in range(procs)]
  for step in range(2 * n // (local * procs)):
    glob = order[step * local * procs:(step + 1) * local * procs]
    assert [parts[p][step * local + j] for p in range(procs) for j in range(local)] == glob


def test_two_processes_see_the_one_process_global_batch(synthetic_data):
  _, out = synthetic_data
  one = ip.pretrain_dataset(out, batch_size=8, image_size=16, seed=3)
  halves = [ip.pretrain_dataset(out, batch_size=4, image_size=16, seed=3, process_index=p,
                                process_count=2) for p in range(2)]
  for step in range(7):    # crosses the epoch boundary (48 records, 8 per global batch)
    for key in ("scene", "person", "label"):
      np.testing.assert_array_equal(
          one[step][key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


@pytest.mark.parametrize("procs,batch", [(1, 5), (3, 4)])
def test_eval_counts_every_example_exactly_once(synthetic_data, procs, batch):
  _, out = synthetic_data
  n = len(ip.ShardSource(out, "test"))     # 16: divides neither 3 processes nor the batches
  seen, steps = [], set()
  for p in range(procs):
    ds = ip.eval_dataset(out, "test", batch_size=batch, image_size=32, process_index=p,
                         process_count=procs)
    steps.add(len(ds))
    for b in ds:
      assert b["image"].shape == (batch, 32, 32, 3)
      seen += list(b["index"][b["mask"]])
      assert np.all(b["label"][~b["mask"]] == -1)
  assert len(steps) == 1                    # every process runs the same number of steps
  assert sorted(seen) == list(range(n))


def test_eval_transform_is_resize_then_center_crop(synthetic_data):
  _, out = synthetic_data
  src = ip.ShardSource(out, "test")
  img = transforms.decode(records.parse(src[0])["image"]).resize((60, 40))
  crop = transforms.resize_center_crop(img, 32, 28)
  assert crop.size == (28, 28)
  expect = np.asarray(img.resize((48, 32), transforms.BICUBIC))[2:30, 10:38]
  np.testing.assert_array_equal(np.asarray(crop), expect)


def test_finetune_batches(synthetic_data):
  _, out = synthetic_data
  b = ip.finetune_dataset(out, batch_size=8, image_size=32, seed=0)[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
  assert set(b) == {"image", "label"}


def test_iterator_resumes_exactly(synthetic_data):
  _, out = synthetic_data
  ds = ip.pretrain_dataset(out, batch_size=4, image_size=16, num_epochs=1)
  grain.experimental.assert_equal_output_after_checkpoint(ds.to_iter_dataset())


@pytest.mark.parametrize("process_index", [0, 1])
def test_resume_with_workers_and_two_processes(synthetic_data, process_index):
  _, out = synthetic_data

  def make():
    return ip.make_iterator(ip.pretrain_dataset(out, batch_size=4, image_size=16, seed=5,
                                                process_index=process_index,
                                                process_count=2), workers=2)
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(4)]
  it.close()
  it = make()
  it.set_state(state)
  got = [next(it) for _ in range(4)]
  it.close()
  for e, g in zip(expect, got):
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


def test_corrupt_record_surfaces_with_shard_and_record(synthetic_data, tmp_path):
  _, out = synthetic_data
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  info = json.load(open(copy / dataset_info.INFO_FILE))
  shard = str(copy / info["splits"]["test"]["shards"][0]["file"])
  offsets = tfrecord.read_index(shard)
  data = bytearray(open(shard, "rb").read())
  data[int(offsets[3]) + 40] ^= 0x55
  open(shard, "wb").write(bytes(data))
  ds = ip.eval_dataset(str(copy), "test", batch_size=16, image_size=16)
  with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard}: record 3"):
    ds[0]


def test_bad_split_and_dir_are_named(synthetic_data, tmp_path):
  _, out = synthetic_data
  with pytest.raises(ValueError, match=r"split 'dev' is not in .*\['test', 'train', 'val'\]"):
    ip.pretrain_dataset(out, "dev", batch_size=4)
  with pytest.raises(FileNotFoundError,
                     match=r"holds no converted dataset \(uniemox_info.json missing\)"):
    ip.pretrain_dataset(str(tmp_path), batch_size=4)
  with pytest.raises(ValueError, match="fewer records than one global batch"):
    ip.pretrain_dataset(out, "test", batch_size=16, process_count=2)


def test_tokens_for_datasets_without_text_embeddings(synthetic_data, tiny_teacher):
  _, out = synthetic_data

  from uniemox_jax.teacher import clip
  tokenize = functools.partial(clip.tokenize_one, tiny_teacher.tokenizer)
  batch = ip.pretrain_dataset(out, batch_size=4, image_size=16, tokenize=tokenize)[0]
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 77)
  assert "text_emb" not in batch


def _jpeg(size, seed=0, fmt="JPEG"):
  import io
  from PIL import Image
  rng = np.random.default_rng(seed)
  # Smooth content (a JPEG's reduced decode is close to a resampled full one only where the
  # image has no detail finer than the reduction).
  small = rng.integers(0, 256, (size // 64, size // 64, 3), np.uint8)
  img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, fmt, quality=95)
  return buf.getvalue()


def test_draft_decoding_reduces_large_jpegs_and_maps_the_boxes():
  data = _jpeg(1024)
  boxes = [(100, 200, 800, 700), (0, 0, 1024, 1024)]
  img, scaled = transforms.decode_for_boxes(transforms.open_lazy(data), boxes, 224)
  # Both boxes keep >= 224 source pixels at 1/2 scale, not at 1/4 (the 700-high box: 175).
  assert img.size == (512, 512)
  assert scaled == [(50.0, 100.0, 400.0, 350.0), (0.0, 0.0, 512.0, 512.0)]
  full, same = transforms.decode_for_boxes(transforms.open_lazy(data), boxes, 224, draft=False)
  assert full.size == (1024, 1024) and same == boxes
  for a, b in zip(scaled, same):
    fast = transforms.to_array(transforms.crop_resize(img, a, 224)).astype(np.float32)
    ref = transforms.to_array(transforms.crop_resize(full, b, 224)).astype(np.float32)
    assert np.abs(fast - ref).mean() < 2.0          # uint8 levels
  # A small box forces the full resolution; PNGs are always decoded whole.
  img, _ = transforms.decode_for_boxes(transforms.open_lazy(data), [(0, 0, 300, 300)], 224)
  assert img.size == (1024, 1024)
  img, _ = transforms.decode_for_boxes(transforms.open_lazy(_jpeg(1024, fmt="PNG")), boxes, 224)
  assert img.size == (1024, 1024)


def test_pretrain_views_with_and_without_draft_decoding_agree():
  """Same random draws, the same crops: only the resampling source differs."""
  serialized = records.Record(_jpeg(1024, seed=3), "train/x.jpg", "x.jpg", 1, "awe", "awe",
                              person_box=[0.1, 0.1, 0.9, 0.9]).serialize()
  out = {}
  for draft in (True, False):
    out[draft] = ip.PretrainTransform(224, "box", draft=draft).random_map(
        serialized, np.random.default_rng(5))
  for view in ("scene", "person"):
    diff = np.abs(out[True][view].astype(np.float32) - out[False][view].astype(np.float32))
    assert diff.mean() < 2.0


def test_train_fraction_keeps_a_seeded_stratified_subset_on_any_process_count(synthetic_data):
  _, out = synthetic_data                        # train: 6 images of each of 8 classes
  labels = np.array([r["label"] for r in _records(out)])
  half = ip.train_subset(out, "train", 0.5, seed=5)
  assert len(half.indices) == 24 and list(half.indices) == sorted(half.indices)
  assert np.bincount(labels[half.indices]).tolist() == [3] * 8
  assert half.summary()["per_class"]["amusement"] == {"kept": 3, "of": 6}
  np.testing.assert_array_equal(ip.train_subset(out, "train", 0.5, seed=5).indices,
                                half.indices)
  assert not np.array_equal(ip.train_subset(out, "train", 0.5, seed=6).indices, half.indices)
  # At least one image of every class, however small the fraction.
  tiny = ip.train_subset(out, "train", 0.01, seed=5)
  assert np.bincount(labels[tiny.indices]).tolist() == [1] * 8
  # The same global batches on one process or two, drawn from the kept records only.
  one = ip.finetune_dataset(out, batch_size=8, image_size=16, seed=3, rand_augment=False,
                            num_epochs=1, subset=half)
  halves = [ip.finetune_dataset(out, batch_size=4, image_size=16, seed=3, rand_augment=False,
                                num_epochs=1, process_index=p, process_count=2, subset=half)
            for p in range(2)]
  assert len(one) == len(halves[0]) == 3
  seen = []
  for step in range(3):                          # one epoch: every kept record once
    np.testing.assert_array_equal(
        one[step]["image"], np.concatenate([halves[0][step]["image"], halves[1][step]["image"]]))
    seen += one[step]["label"].tolist()
  assert sorted(seen) == sorted(labels[half.indices].tolist())
  with pytest.raises(ValueError, match=r"config.data.train_fraction=0 must be in \(0, 1\]"):
    ip.train_subset(out, "train", 0, seed=0)

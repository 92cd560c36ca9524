"""TFRecord framing, atomic shard writes, random access and corruption errors."""
import os

import pytest

from data_pipelines import example_proto
from data_pipelines import tfrecord


def _write(path, payloads):
  with tfrecord.ShardWriter(str(path)) as w:
    for p in payloads:
      w.write(p)
    return w.commit()


def test_round_trip_and_random_access(tmp_path):
  payloads = [bytes([i]) * (i * 37 + 1) for i in range(20)]
  stats = _write(tmp_path / "a", payloads)
  assert stats["records"] == 20 and stats["bytes"] == os.path.getsize(tmp_path / "a")
  _write(tmp_path / "b", [b"x", b"yy"])
  reader = tfrecord.RandomAccessReader([str(tmp_path / "a"), str(tmp_path / "b")])
  assert len(reader) == 22
  assert reader[21] == b"yy" and reader[7] == payloads[7]
  assert [reader[i] for i in range(20)] == payloads
  with pytest.raises(IndexError):
    reader[22]


def test_nothing_published_without_commit(tmp_path):
  path = tmp_path / "shard"
  with pytest.raises(RuntimeError):
    with tfrecord.ShardWriter(str(path)) as w:
      w.write(b"partial")
      raise RuntimeError("killed")
  assert os.listdir(tmp_path) == []


def test_crc_mismatch_names_shard_and_record(tmp_path):
  path = tmp_path / "shard"
  _write(path, [b"a" * 50, b"b" * 50, b"c" * 50])
  data = bytearray(path.read_bytes())
  data[66 + 12 + 10] ^= 0xFF       # inside record 1's payload (record 0 is 12 + 50 + 4 bytes)
  path.write_bytes(bytes(data))
  reader = tfrecord.RandomAccessReader([str(path)])
  assert reader[0] == b"a" * 50
  with pytest.raises(tfrecord.CorruptRecordError, match=rf"{path}: record 1 is corrupt"):
    reader[1]


def test_truncated_shard_names_shard_and_record(tmp_path):
  path = tmp_path / "shard"
  _write(path, [b"a" * 50, b"b" * 50, b"c" * 50])
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(tfrecord.CorruptRecordError,
                     match=rf"shard {path} is 100 bytes.*from record 1 of 3"):
    tfrecord.RandomAccessReader([str(path)])


def test_missing_index_is_named(tmp_path):
  path = tmp_path / "shard"
  _write(path, [b"a"])
  os.remove(str(path) + ".index")
  with pytest.raises(FileNotFoundError, match="index .*shard.index of shard"):
    tfrecord.RandomAccessReader([str(path)])


def test_a_shard_without_index_is_scanned_and_its_damage_named(tmp_path):
  path = tmp_path / "shard"
  _write(path, [b"a" * 50, b"b" * 50, b"c" * 50])          # records of 66 bytes framed
  index = tfrecord.read_index(str(path))
  os.remove(str(path) + ".index")
  assert tfrecord.read_index(str(path), scan_if_missing=True).tolist() == index.tolist()
  whole = path.read_bytes()
  for data, problem in ((whole[:66 + 5], "record 1 is truncated"),       # inside a header
                        (whole[:66 * 2 + 30], "record 2 is truncated"),  # inside a payload
                        (whole[:66] + b"\xff" + whole[67:],
                         "record 1 has a corrupt length header")):
    path.write_bytes(data)
    with pytest.raises(tfrecord.CorruptRecordError, match=rf"{path}: {problem}"):
      tfrecord.scan_offsets(str(path))


def test_example_proto_round_trip():
  import numpy as np
  data = example_proto.serialize({"b": b"\x00\xff", "s": ["x", "y"], "i": 7,
                                  "f": np.asarray([0.5, 1.5], np.float32),
                                  "m": np.asarray([1, 0, 1], np.int64)})
  assert example_proto.parse(data) == {"b": [b"\x00\xff"], "s": [b"x", b"y"], "i": [7],
                                       "f": [0.5, 1.5], "m": [1, 0, 1]}
  with pytest.raises(ValueError, match="feature 'e' is an empty list"):
    example_proto.serialize({"e": []})

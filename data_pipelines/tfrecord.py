"""TFRecord files with a per-shard index: written atomically, read at random, CRC-checked.

Framing (TensorFlow's): uint64 length, uint32 masked CRC32C of the length bytes, the data,
uint32 masked CRC32C of the data, all little-endian. Beside each shard, `<shard>.index`
holds N + 1 little-endian uint64 offsets: where each record starts, then the file size, so
a record is one positioned read.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import struct
from typing import List, Optional, Sequence, Tuple

import google_crc32c
import numpy as np

from data_pipelines import storage

INDEX_SUFFIX = ".index"
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(IOError):
  """A record whose framing or checksum does not hold; the message names shard and record."""


def masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
  length = struct.pack("<Q", len(record))
  return length + struct.pack("<I", masked_crc(length)) + record + _FOOTER.pack(masked_crc(record))


class ShardWriter:
  """Writes one shard under a temporary name; `commit()` renames the index, then the shard,
  into place, so a shard that exists under its final name is always complete. Without a
  commit (a crash, an exception in a `with` block), nothing is left under the final names.
  A shard in a bucket (`gs://...`) is written to a local temporary file and uploaded by
  `commit()`, index first: an object appears only once its upload has completed."""

  def __init__(self, path: str):
    self.path = path
    if storage.is_remote(path):
      import tempfile  # pylint: disable=g-import-not-at-top
      fd, self._tmp = tempfile.mkstemp(prefix="shard-", suffix=".tmp")
      os.close(fd)
    else:
      self._tmp = f"{path}.tmp-{os.getpid()}"
    self._file = open(self._tmp, "wb")
    self._offsets: List[int] = []
    self._sha = hashlib.sha256()
    self._crc = google_crc32c.Checksum()
    self._pos = 0

  def write(self, record: bytes) -> None:
    data = frame(record)
    self._offsets.append(self._pos)
    self._file.write(data)
    self._sha.update(data)
    self._crc.update(data)
    self._pos += len(data)

  def commit(self) -> dict:
    """Closes and publishes the shard; returns {records, bytes, sha256, crc32c} (crc32c in
    the base64 form a bucket reports, so a kept remote shard is checked without a download)."""
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    index = np.asarray(self._offsets + [self._pos], dtype="<u8")
    tmp_index = self._tmp + INDEX_SUFFIX
    with open(tmp_index, "wb") as f:
      f.write(index.tobytes())
    if storage.is_remote(self.path):
      storage.upload(tmp_index, self.path + INDEX_SUFFIX)
      storage.upload(self._tmp, self.path)
      self.abort()
    else:
      os.replace(tmp_index, self.path + INDEX_SUFFIX)
      os.replace(self._tmp, self.path)
    return {"records": len(self._offsets), "bytes": self._pos, "sha256": self._sha.hexdigest(),
            "crc32c": storage.crc32c_b64(int.from_bytes(self._crc.digest(), "big"))}

  def abort(self) -> None:
    """Removes the temporary files (nothing under the final names is touched)."""
    self._file.close()
    for p in (self._tmp, self._tmp + INDEX_SUFFIX):
      if os.path.exists(p):
        os.remove(p)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is not None:
      self.abort()


def compression_of(head: bytes) -> Optional[str]:
  """"GZIP" or "ZLIB" when a file starts the way those streams do (RFC 1952 / RFC 1950),
  else None. (An uncompressed TFRecord starts with a length whose CRC follows.)"""
  if head[:2] == b"\x1f\x8b":
    return "GZIP"
  if len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and \
      (head[0] * 256 + head[1]) % 31 == 0:
    return "ZLIB"
  return None


def _compressed_error(path: str, kind: str) -> CorruptRecordError:
  return CorruptRecordError(
      f"{path} is a {kind}-compressed TFRecord file; records are read by byte offset, so "
      f"decompress it first (e.g. tf.data.TFRecordDataset(path, compression_type='{kind}') "
      "into a tf.io.TFRecordWriter without compression)")


def file_sha256(path: str, algorithm: str = "sha256") -> str:
  """The hex digest of a whole file, read in 4 MiB chunks (sha256: the checksum the info file
  records)."""
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def scan_offsets(path: str) -> np.ndarray:
  """The N + 1 record offsets of a shard without an index (one written by TFDS or tf.data),
  found by walking the length headers; a bad header or a cut-off record is named, and so is a
  compressed file."""
  offsets, pos = [0], 0
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    while pos < size:
      header = f.read(_HEADER.size)
      short = len(header) < _HEADER.size
      length, length_crc = (0, None) if short else _HEADER.unpack_from(header)
      if short or masked_crc(header[:8]) != length_crc:
        if pos == 0 and compression_of(header):
          raise _compressed_error(path, compression_of(header))
        raise CorruptRecordError(f"{path}: record {len(offsets) - 1} " + (
            "is truncated" if short else "has a corrupt length header (CRC mismatch)"))
      pos += _HEADER.size + length + _FOOTER.size
      if pos > size:
        raise CorruptRecordError(f"{path}: record {len(offsets) - 1} is truncated")
      f.seek(pos)
      offsets.append(pos)
  return np.asarray(offsets, np.int64)


def read_index(path: str, scan_if_missing: bool = False) -> np.ndarray:
  """The N + 1 offsets of a shard; fails, naming the shard, when the index is absent (unless
  `scan_if_missing`: then the shard is scanned) or does not describe the file as it is (a
  truncated or replaced shard)."""
  index_path = path + INDEX_SUFFIX
  if not os.path.exists(path):
    raise FileNotFoundError(f"TFRecord shard {path} does not exist")
  if scan_if_missing and not os.path.exists(index_path):
    return scan_offsets(path)
  if not os.path.exists(index_path):
    raise FileNotFoundError(f"index {index_path} of shard {path} is missing; rerun the "
                            "conversion (finished shards are kept) to rebuild it")
  offsets = np.fromfile(index_path, dtype="<u8").astype(np.int64)
  if offsets.size < 1 or np.any(np.diff(offsets) <= 0) or offsets[0] != 0:
    raise CorruptRecordError(f"index {index_path} is malformed")
  size = os.path.getsize(path)
  if size != offsets[-1]:
    first_bad = int(np.searchsorted(offsets[1:], size, side="right"))
    raise CorruptRecordError(
        f"shard {path} is {size} bytes but its index says {int(offsets[-1])}: truncated or "
        f"modified from record {first_bad} of {offsets.size - 1}")
  return offsets


def unframe(data: bytes, path: str, i: int) -> bytes:
  """The payload of one framed record, with both CRCs checked."""
  if len(data) < _HEADER.size + _FOOTER.size:
    raise CorruptRecordError(f"{path}: record {i} is truncated ({len(data)} bytes)")
  length, length_crc = _HEADER.unpack_from(data)
  if masked_crc(data[:8]) != length_crc:
    raise CorruptRecordError(f"{path}: record {i} has a corrupt length header (CRC mismatch)")
  if length != len(data) - _HEADER.size - _FOOTER.size:
    raise CorruptRecordError(f"{path}: record {i} is {len(data)} bytes framed, its header says "
                             f"{length} of payload")
  payload = data[_HEADER.size:_HEADER.size + length]
  (crc,) = _FOOTER.unpack_from(data, _HEADER.size + length)
  if masked_crc(payload) != crc:
    raise CorruptRecordError(f"{path}: record {i} is corrupt (data CRC mismatch)")
  return payload


class RandomAccessReader:
  """Record i of a list of shards, by global index. Picklable: file handles are opened lazily
  in each process (grain workers included), never shared across a fork."""

  def __init__(self, paths: Sequence[str], scan_if_missing: bool = False):
    """`scan_if_missing`: shards without an index (TFDS-built) are scanned once, here."""
    self.paths = list(paths)
    self._offsets = [read_index(p, scan_if_missing) for p in self.paths]
    counts = [len(o) - 1 for o in self._offsets]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
    self._fds: dict = {}
    self._pid: Optional[int] = None

  def __len__(self) -> int:
    return self._starts[-1]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"], state["_pid"] = {}, None
    return state

  def locate(self, index: int) -> Tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    shard = bisect.bisect_right(self._starts, index) - 1
    return shard, index - self._starts[shard]

  def _fd(self, shard: int) -> int:
    if self._pid != os.getpid():
      self._fds, self._pid = {}, os.getpid()
    if shard not in self._fds:
      self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
    return self._fds[shard]

  def __getitem__(self, index: int) -> bytes:
    shard, i = self.locate(index)
    start, end = int(self._offsets[shard][i]), int(self._offsets[shard][i + 1])
    data = os.pread(self._fd(shard), end - start, start)
    return unframe(data, self.paths[shard], i)


def local_shard(path: str, size: Optional[int] = None, sha256: Optional[str] = None) -> str:
  """A local path of the shard at `path` and its index (when it has one): `path` itself when
  local, else copies in this host's cache (`storage.local_copy`, checked against `size` and
  `sha256` when given), made once and reused by later runs."""
  if not storage.is_remote(path):
    return path
  local = storage.local_copy(path, size, sha256)
  if storage.exists(path + INDEX_SUFFIX):
    storage.local_copy(path + INDEX_SUFFIX, dest=local + INDEX_SUFFIX)
  return local


def read_all(path: str) -> List[bytes]:
  """Every record of one shard, in order, checked (for tests and tools)."""
  reader = RandomAccessReader([path])
  return [reader[i] for i in range(len(reader))]

r"""Reading a converted dataset from a bucket, against local disk in the same run.

  python benchmarks/remote_reads.py [--images_per_class 60] [--size 128] [--shard_size 64]

Starts a GCS-protocol server on 127.0.0.1 (fake-gcs-server, from the test extra), converts one
synthetic dataset both to a local folder and into a bucket, then reads every training record
once in a shuffled order, CRC-checked, and reports the time to open the split (for a bucket:
listing checks and the cache copies), records/s of the reads after it and overall, and HTTP
requests per record, for:
  local          ShardSource over the local folder (positioned reads)
  bucket_cold    ShardSource over gs:// with an empty host cache (each shard and index copied
                 once, sha256-checked, then read locally): what a first run pays
  bucket_warm    the same with the cache filled by the previous pass: what a restart pays
  per_record     one ranged GET per record straight from the bucket (no cache): the naive
                 remote reader, for comparison
Requests are counted at gcsfs's request call. The server is on loopback, so these are lower
bounds on a real bucket's latency cost; the request counts carry over as they are.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from uniemox_jax.tools import convert as convert_command  # noqa: E402
from data_pipelines import dataset_info  # noqa: E402
from data_pipelines import input_pipeline as ip  # noqa: E402
from data_pipelines import tfrecord  # noqa: E402
from tests import gcs_server  # noqa: E402


class RequestCounter:
  """Counts the HTTP requests gcsfs makes (one per call of its request method)."""

  def __init__(self):
    import gcsfs.core  # pylint: disable=g-import-not-at-top
    self.n = 0
    original = gcsfs.core.GCSFileSystem._call
    counter = self

    async def counted(fs, *args, **kwargs):
      counter.n += 1
      return await original(fs, *args, **kwargs)
    gcsfs.core.GCSFileSystem._call = counted


def read_all(source, order):
  for i in order:
    source[int(i)]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images_per_class", type=int, default=60)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--shard_size", type=int, default=64)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    server = gcs_server.GcsServer(os.path.join(tmp, "gcs")).start()
    try:
      os.environ.update(server.env, UNIEMOX_CACHE_DIR=os.path.join(tmp, "cache"))
      server.create_bucket("bench")
      counter = RequestCounter()
      common = ["--source", "synthetic", "--name", "bench", "--per_class",
                f"{args.images_per_class},2,2", "--image_size", str(args.size),
                "--shard_size", str(args.shard_size), "--workers", "1", "--no_progress",
                "--no_tfds_metadata", "--root", os.path.join(tmp, "raw")]
      local_dir, remote_dir = os.path.join(tmp, "local"), "gs://bench/data"
      for out in (local_dir, remote_dir):
        convert_command.main(common + ["--out", out])
      rows = []

      def measure(name, make_source):
        counter.n = 0
        start = time.perf_counter()
        source = make_source()
        opened = time.perf_counter()
        order = np.random.default_rng(0).permutation(len(source))
        read_all(source, order)
        end = time.perf_counter()
        rows.append((name, opened - start, len(source) / (end - opened),
                     len(source) / (end - start), counter.n / len(source), counter.n))

      measure("local", lambda: ip.ShardSource(local_dir, "train"))
      measure("bucket_cold", lambda: ip.ShardSource(remote_dir, "train"))
      measure("bucket_warm", lambda: ip.ShardSource(remote_dir, "train"))

      def per_record():
        info = dataset_info.DatasetInfo.load(remote_dir)
        import fsspec  # pylint: disable=g-import-not-at-top
        fs = fsspec.filesystem("gs")
        shards = [f"{remote_dir}/{e.file}" for e in info.splits["train"].shards]
        offsets = [np.frombuffer(fs.cat_file(s + tfrecord.INDEX_SUFFIX), "<u8") for s in shards]
        index = [(s, k) for s, o in zip(range(len(shards)), offsets) for k in range(len(o) - 1)]

        class Direct:
          def __len__(self):
            return len(index)

          def __getitem__(self, i):
            s, k = index[i]
            data = fs.cat_file(shards[s], start=int(offsets[s][k]), end=int(offsets[s][k + 1]))
            return tfrecord.unframe(data, shards[s], k)
        return Direct()
      measure("per_record", per_record)
    finally:
      server.stop()
  base = rows[0][3]
  print(f"{'reader':<12} {'open s':>7} {'read rec/s':>11} {'total rec/s':>12} {'vs local':>9} "
        f"{'requests/record':>16} {'requests':>9}")
  for name, open_s, read_rate, rate, per, n in rows:
    print(f"{name:<12} {open_s:>7.3f} {read_rate:>11.0f} {rate:>12.0f} {rate / base:>9.3f} "
          f"{per:>16.3f} {n:>9d}")


if __name__ == "__main__":
  main()

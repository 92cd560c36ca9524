r"""Input-pipeline throughput per worker, against a bare decode-and-crop loop in the same run.

  python benchmarks/input_pipeline.py [--images_per_class 40] [--size 256] [--workers 2]

Makes a synthetic dataset of `size`-pixel JPEGs, times its conversion with one worker, then
times, each on one core (in-process, one read thread, no worker processes):
  bare       plain loops: read JPEG bytes from disk, decode, RandomResizedCrop to 224 (PIL,
             bicubic) once; twice (the image work of two views); once + RandAugment
  pretrain   the two-view pretraining pipeline (scene RRC + flip, person box crop), batched,
             with JPEG draft decoding (the default) and with full decodes
  finetune   the fine-tuning pipeline (RRC + flip + RandAugment m9), batched
and the pretraining pipeline again with `--workers` grain worker processes. Draft decoding
only helps when crops are far smaller than the stored image: try --size 1024. Prints images/s,
each rate's ratio to the one-crop bare loop, and each pipeline's ratio to the bare loop doing
the same image work (what the pipeline machinery itself costs).
"""
import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from uniemox_jax.tools import convert as convert_command  # noqa: E402
from data_pipelines import input_pipeline as ip  # noqa: E402
from data_pipelines import synthetic  # noqa: E402
from data_pipelines import transforms  # noqa: E402


def _rate(fn, n):
  start = time.perf_counter()
  fn()
  return n / (time.perf_counter() - start)


def bare_loop(files, size, rng, crops=1, rand_augment=False):
  """Read, decode, `crops` random-resized crops (+ RandAugment): no pipeline around it."""
  for path in files:
    with open(path, "rb") as f:
      img = transforms.decode(f.read())
    for _ in range(crops):
      box = transforms.random_resized_crop_box(*img.size, rng, (0.2, 1.0))
      view = transforms.crop_resize(img, box, size)
      if rand_augment:
        view = transforms.rand_augment(view, rng)
      transforms.to_array(view)


def drain(ds, steps, workers=0):
  # One read thread: with no workers this measures one core; with workers, one per worker.
  it = ip.make_iterator(ds, workers=workers, read_threads=1)
  next(it)   # worker start-up is not throughput
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  elapsed = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return elapsed


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images_per_class", type=int, default=40)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="uniemox_bench_")
  raw, out = os.path.join(tmp, "raw"), os.path.join(tmp, "shards")
  synthetic.generate(raw, (args.images_per_class, 0, 0), args.size)
  n = args.images_per_class * 8
  conv = _rate(lambda: convert_command.main(
      ["--source", "split_tree", "--root", raw, "--name", "b", "--out", out, "--workers", "1",
       "--person_boxes", os.path.join(raw, "boxes.json"), "--attributes",
       os.path.join(raw, "attributes.json"), "--no_progress"]), n)
  files = sorted(glob.glob(os.path.join(raw, "train", "*", "*.jpg")))
  def bare(**kw):
    return _rate(lambda: bare_loop(files, args.image_size, np.random.default_rng(0), **kw), n)
  bare_one, bare_two, bare_ra = bare(), bare(crops=2), bare(rand_augment=True)
  steps = n // args.batch - 1
  rows = [("conversion (1 worker)", conv, None, None),
          ("bare: decode + 1 crop", bare_one, 1.0, None),
          ("bare: decode + 2 crops (pretrain's image work)", bare_two, bare_two / bare_one, 1.0),
          ("bare: decode + crop + RandAugment (finetune's)", bare_ra, bare_ra / bare_one, 1.0)]
  for name, ds, same_work in (
      ("pretrain pipeline", ip.pretrain_dataset(out, batch_size=args.batch,
                                                image_size=args.image_size), bare_two),
      ("pretrain pipeline, full decodes", ip.pretrain_dataset(
          out, batch_size=args.batch, image_size=args.image_size, draft_decode=False),
       bare_two),
      ("finetune pipeline", ip.finetune_dataset(out, batch_size=args.batch,
                                                image_size=args.image_size), bare_ra)):
    rate = steps * args.batch / drain(ds, steps)
    rows.append((name + " (1 core)", rate, rate / bare_one, rate / same_work))
  ds = ip.pretrain_dataset(out, batch_size=args.batch, image_size=args.image_size)
  total = 4 * steps * args.batch / drain(ds, 4 * steps, args.workers)
  rows.append((f"pretrain pipeline ({args.workers} workers, total)", total, None, None))
  print(f"{args.size}px JPEGs -> {args.image_size}px views, {n} images, batch {args.batch}, "
        f"{os.cpu_count()} cores")
  print(f"{'what':50s} {'images/s':>9s} {'vs 1 crop':>10s} {'vs same work':>13s}")
  for name, rate, ratio, same in rows:
    fmt = lambda r, w: " " * w if r is None else f"{r:{w}.2f}"  # noqa: E731
    print(f"{name:50s} {rate:9.1f} {fmt(ratio, 10)} {fmt(same, 13)}")


if __name__ == "__main__":
  main()

"""Which converted dataset a run reads, and how many examples a split holds: shared by the
training tasks and the evaluation commands."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict

from absl import logging
import jax

from data_pipelines import input_pipeline
from uniemox_jax import distributed
from uniemox_jax import storage


def resolve_data_dir(config, workdir: str) -> str:
  """config.data.dir, or (with config.data.synthetic) the synthetic set built in the workdir."""
  if config.data.dir:
    return config.data.dir
  if not config.data.get("synthetic", False):
    raise ValueError("config.data.dir is empty: point it at a folder written by "
                     "`python -m data_pipelines.convert`")
  out = storage.join(workdir, "synthetic")
  if jax.process_index() == 0 and not storage.exists(
      storage.join(out, input_pipeline.INFO_FILE)):
    # Without TFDS metadata: TensorFlow Datasets stays out of the training process (convert
    # the synthetic set with the CLI to get a TFDS dataset).
    from data_pipelines import convert  # pylint: disable=g-import-not-at-top
    summary = io.StringIO()      # the conversion's report goes to the log, not the terminal
    with contextlib.redirect_stdout(summary):
      code = convert.main(["--source", "synthetic", "--name", "synthetic", "--out", out,
                           "--per_class", config.data.synthetic_per_class,
                           "--image_size", str(config.data.synthetic_image_size),
                           "--workers", "1", "--no_progress", "--no_tfds_metadata"])
    logging.info("Demo data in %s:\n%s", out, summary.getvalue())
    if code:
      raise RuntimeError(f"the demo data in {out} failed its verification:\n"
                         f"{summary.getvalue()}")
  distributed.barrier("synthetic data written")
  return out


def num_examples(info: Dict[str, Any], split: str) -> int:
  return sum(info["splits"][s]["num_records"] for s in split.split("+")
             if s in info["splits"])


def check_dataset(config, info: Dict[str, Any]) -> None:
  """The data's classes must be the ones config.dataset promises."""
  expected = config.get("num_classes", 0)
  names = info["class_names"]
  if expected and len(names) != expected:
    raise ValueError(f"config.dataset={config.get('dataset')!r} has {expected} classes but "
                     f"{config.data.dir or 'the data'} has {len(names)}: {names}")
  if bool(info.get("multi_label")) != bool(config.get("multi_label", False)):
    raise ValueError(f"config.multi_label={config.get('multi_label')} but the data's "
                     f"multi_label is {info.get('multi_label')}")

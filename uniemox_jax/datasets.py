"""Which converted dataset a run reads, and how many examples a split holds: shared by the
training tasks and the evaluation commands."""
from __future__ import annotations

from typing import Any, Dict

from absl import logging
import jax

from data_pipelines import input_pipeline
from data_pipelines import synthetic
from data_pipelines import storage
from uniemox_jax import distributed


def resolve_data_dir(config, workdir: str) -> str:
  """config.data.dir, or (with config.data.synthetic) the synthetic set built in the workdir."""
  if config.data.dir:
    return config.data.dir
  if not config.data.get("synthetic", False):
    raise ValueError("config.data.dir is empty: point it at a folder written by "
                     "`python -m uniemox_jax.tools.convert`")
  out = storage.join(workdir, "synthetic")
  if jax.process_index() == 0 and not storage.exists(
      storage.join(out, input_pipeline.INFO_FILE)):
    # Without TFDS metadata: TensorFlow Datasets stays out of the training process (convert
    # the synthetic set with the conversion command to get a TFDS dataset).
    info, _ = synthetic.build_dataset(
        out, [int(x) for x in config.data.synthetic_per_class.split(",")],
        config.data.synthetic_image_size, tfds_metadata=False)
    logging.info("Demo data in %s: %s", out, {s: v["num_records"]
                                               for s, v in info["splits"].items()})
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

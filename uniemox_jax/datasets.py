"""Which converted dataset a run reads, and how many examples a split holds: shared by the
training tasks and the evaluation commands."""
from __future__ import annotations

from absl import logging
import jax

from data_pipelines import dataset_info
from data_pipelines import storage
from data_pipelines import synthetic
from uniemox_jax import distributed


def resolve_data_dir(config, workdir: str) -> str:
  """config.data.dir, or (with config.data.synthetic) the synthetic set built in the workdir."""
  if config.data.dir:
    return config.data.dir
  if not config.data.synthetic:
    raise ValueError("config.data.dir is empty: point it at a folder written by "
                     "`python -m uniemox_jax.tools.convert`")
  out = storage.join(workdir, "synthetic")
  if jax.process_index() == 0 and not storage.exists(
      storage.join(out, dataset_info.INFO_FILE)):
    # Without TFDS metadata: TensorFlow Datasets stays out of the training process (convert
    # the synthetic set with the conversion command to get a TFDS dataset).
    info, _ = synthetic.build_dataset(
        out, [int(x) for x in config.data.synthetic_per_class.split(",")],
        config.data.synthetic_image_size, tfds_metadata=False)
    logging.info("Demo data in %s: %s", out, {s: v.num_records for s, v in info.splits.items()})
  distributed.barrier("synthetic data written")
  return out


def check_dataset(config, info: dataset_info.DatasetInfo) -> None:
  """The data's classes must be the ones config.dataset promises."""
  names = list(info.class_names)
  if config.num_classes and len(names) != config.num_classes:
    raise ValueError(f"config.dataset={config.dataset!r} has {config.num_classes} classes but "
                     f"{config.data.dir or 'the data'} has {len(names)}: {names}")
  if info.multi_label != bool(config.multi_label):
    raise ValueError(f"config.multi_label={config.multi_label} but the data's multi_label is "
                     f"{info.multi_label}")

"""TensorBoard event files without TensorFlow, and the profiler window of a training run.

An event file is a TFRecord file of `Event` protos: first one naming the file version, then one
per `write_*` call. The protos, the scalar summary and the image plugin's metadata come from the
`tensorboard` package (its proto modules import no TensorFlow); the records are framed by
`data_pipelines.tfrecord.frame`, the same CRC32C framing our shards use. Scalars and images are
written the way TF2's `tf.summary` writes them (tensors tagged with their plugin), so
TensorBoard and its event readers see what they saw from clu's TensorFlow writer.

  writer = summaries.SummaryWriter(logdir)     # process 0; NullWriter() elsewhere
  writer.write_scalars(step, {"total": 0.5})
  writer.write_images(step, {"grid": uint8 [N, H, W, 3]})
  writer.flush(); writer.close()
"""
from __future__ import annotations

import io
import os
import socket
import time
from typing import Mapping

import jax
import numpy as np

from data_pipelines import storage
from data_pipelines import tfrecord


def _protos():
  # Imported on first use: the tensorboard package is only needed by process 0's writer.
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import tensor_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import tensor_shape_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import types_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.image import metadata as image_metadata  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.scalar import summary_v2 as scalar_summary  # pylint: disable=g-import-not-at-top
  return (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2, image_metadata,
          scalar_summary)


def png(image: np.ndarray) -> bytes:
  """PNG bytes of an [H, W, C] image (uint8, or floats in [0, 1]); C is 1, 3 or 4."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


class SummaryWriter:
  """Appends events to a new `events.out.tfevents.*` file in `logdir` (a local folder)."""

  def __init__(self, logdir: str):
    (self._event_pb2, self._summary_pb2, self._tensor_pb2, self._shape_pb2, self._types_pb2,
     self._image_metadata, self._scalar_summary) = _protos()
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.v2")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    # Flushed at once (one event per log step): the workdir's mirror uploads this file at each
    # checkpoint, and a killed run keeps every event written before it.
    with storage.naming(self.path):
      self._file.write(tfrecord.frame(event.SerializeToString()))
      self._file.flush()

  def _summary(self, step: int, values) -> None:
    summary = self._summary_pb2.Summary(value=values)
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [self._scalar_summary.scalar_pb(tag, float(jax.device_get(v))).value[0]
              for tag, v in scalars.items()]
    self._summary(step, values)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Each value is [N, H, W, C]: N images under one tag."""
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim != 4:
        raise ValueError(f"image summary {tag!r}: expected [N, H, W, C], got {batch.shape}")
      n, h, w = batch.shape[:3]
      metadata = self._image_metadata.create_summary_metadata(display_name=tag, description="")
      metadata.data_class = self._summary_pb2.DATA_CLASS_BLOB_SEQUENCE
      tensor = self._tensor_pb2.TensorProto(
          # [width, height, png_0, ..., png_{n-1}], as tf.summary.image writes them.
          dtype=self._types_pb2.DT_STRING,
          tensor_shape=self._shape_pb2.TensorShapeProto(
              dim=[self._shape_pb2.TensorShapeProto.Dim(size=n + 2)]),
          string_val=[str(w).encode(), str(h).encode()] + [png(im) for im in batch])
      values.append(self._summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))
    self._summary(step, values)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


class NullWriter:
  """The writer of processes other than 0: takes every call, writes nothing."""

  def write_scalars(self, step, scalars) -> None:
    del step, scalars

  def write_images(self, step, images) -> None:
    del step, images

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class ProfileWindow:
  """Records a `jax.profiler` trace of steps first+1 .. first+num into `logdir` (TensorBoard's
  profile plugin reads it from logdir/plugins/profile/)."""

  def __init__(self, logdir: str, first: int, num: int):
    self.logdir, self.first, self.last = logdir, first, first + num
    self.active = False

  def __call__(self, step: int, outputs=None) -> None:
    """Called after step `step` was dispatched; `outputs` are waited on before stopping."""
    if not self.active and step == self.first:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and step >= self.last:
      if outputs is not None:
        jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False

"""TensorBoard event files written without TensorFlow, read back by TensorBoard's own reader."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax import summaries


def test_tensorboard_reads_scalars_and_images(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  from PIL import Image
  import io
  writer = summaries.SummaryWriter(str(tmp_path))
  writer.write_scalars(5, {"total": 1.25, "zero_shot/top1": np.float32(0.5)})
  writer.write_scalars(10, {"total": jnp.asarray(0.75)})
  grid = np.zeros((2, 6, 9, 3), np.uint8)
  grid[1, 2, 3] = (255, 0, 7)
  writer.write_images(10, {"reconstruction/grid": grid})
  writer.write_images(10, {"floats": np.full((1, 4, 4, 1), 0.5, np.float32)})
  writer.close()
  assert os.path.basename(writer.path).startswith("events.out.tfevents.")

  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  assert set(events.PluginTagToContent("scalars")) == {"total", "zero_shot/top1"}
  assert set(events.PluginTagToContent("images")) == {"reconstruction/grid", "floats"}
  total = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
           for e in events.Tensors("total")]
  assert total == [(5, 1.25), (10, 0.75)]
  (image,) = events.Tensors("reconstruction/grid")
  width, height, *pngs = tensor_util.make_ndarray(image.tensor_proto)
  assert image.step == 10 and (int(width), int(height)) == (9, 6) and len(pngs) == 2
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pngs[1]))), grid[1])
  (gray,) = events.Tensors("floats")
  assert np.asarray(Image.open(io.BytesIO(tensor_util.make_ndarray(gray.tensor_proto)[2]))).max() \
      == 128


def test_a_damaged_event_file_is_refused_by_tensorboards_reader(tmp_path):
  """The records carry real CRCs: flipping a payload byte makes the reader stop there."""
  from tensorboard.backend.event_processing import event_file_loader
  writer = summaries.SummaryWriter(str(tmp_path))
  for step in range(3):
    writer.write_scalars(step, {"x": float(step)})
  read = lambda: [e.step for e in event_file_loader.EventFileLoader(writer.path).Load()
                  if e.HasField("summary")]
  assert read() == [0, 1, 2]       # on disk before close: the mirror uploads it at checkpoints
  writer.close()
  blob = bytearray(open(writer.path, "rb").read())
  blob[-8] ^= 0xFF                  # inside the last record's payload
  open(writer.path, "wb").write(bytes(blob))
  assert read() == [0, 1]


def test_images_must_be_a_batch(tmp_path):
  writer = summaries.SummaryWriter(str(tmp_path))
  with pytest.raises(ValueError, match=r"'grid': expected \[N, H, W, C\]"):
    writer.write_images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
  writer.close()


def test_profile_window_writes_a_trace(tmp_path):
  window = summaries.ProfileWindow(str(tmp_path), first=2, num=2)
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  for step in range(1, 6):
    y = f(x)
    window(step, y)
    assert window.active == (step in (2, 3))
  window.close()
  traces = [f for _, _, files in os.walk(tmp_path / "plugins" / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces

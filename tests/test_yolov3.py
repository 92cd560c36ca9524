"""YOLOv3 from Darknet files: cfg parsing, the weights layout, the forward pass against
PyTorch, decoding and NMS against NumPy, letterbox geometry, errors, and the converter's
--person_boxes yolov3:CFG,WEIGHTS."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipelines import convert
from data_pipelines import input_pipeline as ip
from data_pipelines import records
from data_pipelines import yolov3
from tests import formats
from uniemox_jax.tools import convert as convert_command

TINY_CFG = """
[net]
width=32
height=32
channels=3

# 0
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

# 1: downsample
[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

# 2
[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

# 3
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

# 4
[shortcut]
from=-3
activation=linear

# 5: 2 anchors x (5 + 2 classes)
[convolutional]
size=1
stride=1
pad=1
filters=14
activation=linear

# 6
[yolo]
mask=2,3
anchors=4,6, 8,10, 12,16, 20,24
classes=2
num=4

# 7
[route]
layers=-3

# 8
[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

# 9
[upsample]
stride=2

# 10
[route]
layers=-1, 0

# 11
[convolutional]
size=1
stride=1
pad=1
filters=14
activation=linear

# 12
[yolo]
mask=0,1
anchors=4,6, 8,10, 12,16, 20,24
classes=2
num=4
"""


def _random_params(cfg, seed=0):
  rng = np.random.RandomState(seed)
  params = jax.tree.map(np.asarray, yolov3.Darknet.from_cfg(cfg).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
  out = {}
  for name, layer in params.items():
    out[name] = {k: (rng.rand(*v.shape).astype(np.float32) + 0.5 if k == "bn_var" else
                     (0.3 * rng.randn(*v.shape)).astype(np.float32)) for k, v in layer.items()}
  return out


@pytest.fixture
def cfg():
  return yolov3.parse_cfg(TINY_CFG)


def test_cfg_builds_and_runs(cfg):
  net = yolov3.Darknet.from_cfg(cfg)
  outs = net.apply({"params": _random_params(cfg)}, jnp.zeros((2, 32, 32, 3)))
  assert [o.shape for o in outs] == [(2, 16, 16, 2, 7), (2, 32, 32, 2, 7)]
  _, channels, heads = yolov3.channels_and_heads(cfg)
  assert channels[10] == 16 and sorted(heads) == [6, 12]
  assert heads[6].anchors == ((12.0, 16.0), (20.0, 24.0))


@pytest.mark.parametrize("version", [(0, 2, 0), (0, 1, 0)])
def test_weights_round_trip_exactly(cfg, tmp_path, version):
  params = _random_params(cfg, seed=1)
  path = str(tmp_path / "tiny.weights")
  formats.darknet_weights(path, params, cfg, version=version, seen=123)
  header = 20 if version == (0, 2, 0) else 16
  n = sum(v.size for layer in params.values() for v in layer.values())
  assert os.path.getsize(path) == header + 4 * n
  loaded = yolov3.load_weights(path, cfg)
  assert loaded.keys() == params.keys()
  for name in params:
    for k in params[name]:
      np.testing.assert_array_equal(loaded[name][k], params[name][k])
  # The file order is Darknet's: the first conv's BN biases, scales, means, variances, kernel.
  raw = np.fromfile(path, "<f4", offset=header)
  np.testing.assert_array_equal(raw[:8], params["conv_0"]["bn_bias"])
  np.testing.assert_array_equal(raw[8:16], params["conv_0"]["bn_scale"])
  np.testing.assert_array_equal(raw[32:32 + 8 * 3 * 9],
                                params["conv_0"]["kernel"].transpose(3, 2, 0, 1).ravel())


def test_weights_that_do_not_fit_the_cfg_are_refused(cfg, tmp_path):
  path = str(tmp_path / "w.weights")
  formats.darknet_weights(path, _random_params(cfg), cfg)
  data = open(path, "rb").read()
  short = tmp_path / "short.weights"
  short.write_bytes(data[:-400])
  with pytest.raises(ValueError, match=r"short.weights holds .* floats .* needs \d+: the file "
                                       r"runs out at cfg layer 11"):
    yolov3.load_weights(str(short), cfg, "tiny.cfg")
  long = tmp_path / "long.weights"
  long.write_bytes(data + b"\0" * 40)
  with pytest.raises(ValueError, match=r"\(10 left over\): the weights belong to another cfg"):
    yolov3.load_weights(str(long), cfg)
  with pytest.raises(FileNotFoundError, match="do not exist"):
    yolov3.load_weights(str(tmp_path / "none"), cfg)


def test_cfg_errors_are_named():
  with pytest.raises(ValueError, match=r"layer 0 is a \[maxpool\]"):
    yolov3.parse_cfg("[net]\nwidth=32\n[maxpool]\nsize=2\n")
  with pytest.raises(ValueError, match="first section must be"):
    yolov3.parse_cfg("[convolutional]\nfilters=3\n")
  with pytest.raises(ValueError, match="cfg:3: expected key=value"):
    yolov3.parse_cfg("[net]\nwidth=32\nnonsense\n")
  bad = yolov3.parse_cfg("[net]\n[convolutional]\nfilters=4\nsize=1\n[route]\nlayers=-5\n")
  with pytest.raises(ValueError, match="route layer 1"):
    yolov3.Darknet.from_cfg(bad)


def _torch_forward(cfg, params, x):
  """The cfg's network written directly in PyTorch (NCHW), for comparison."""
  outputs, results = [], []
  t = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for i, layer in enumerate(cfg[1:]):
    kind = layer["type"]
    if kind == "convolutional":
      p = params[f"conv_{i}"]
      k = int(layer["size"])
      w = torch.from_numpy(p["kernel"].transpose(3, 2, 0, 1).copy())
      bias = None if "bias" not in p else torch.from_numpy(p["bias"])
      t = F.conv2d(t, w, bias, stride=int(layer["stride"]), padding=k // 2)
      if "bn_scale" in p:
        t = F.batch_norm(t, torch.from_numpy(p["bn_mean"]), torch.from_numpy(p["bn_var"]),
                         torch.from_numpy(p["bn_scale"]), torch.from_numpy(p["bn_bias"]),
                         training=False, eps=1e-5)
      if layer["activation"] == "leaky":
        t = F.leaky_relu(t, 0.1)
    elif kind == "shortcut":
      t = t + outputs[i + int(layer["from"])]
    elif kind == "route":
      idx = [int(v) for v in layer["layers"].split(",")]
      t = torch.cat([outputs[v if v >= 0 else i + v] for v in idx], dim=1)
    elif kind == "upsample":
      t = F.interpolate(t, scale_factor=int(layer["stride"]), mode="nearest")
    elif kind == "yolo":
      results.append(t.numpy().transpose(0, 2, 3, 1))
    outputs.append(t)
  return results


def test_forward_matches_pytorch(cfg):
  params = _random_params(cfg, seed=2)
  x = np.random.RandomState(3).rand(2, 32, 32, 3).astype(np.float32)
  ours = yolov3.Darknet.from_cfg(cfg).apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    ref = _torch_forward(cfg, params, x)
  for a, b in zip(ours, ref):
    assert np.abs(np.asarray(a).reshape(b.shape) - b).max() < 1e-4


def test_decode_matches_numpy():
  rng = np.random.RandomState(4)
  head = yolov3.YoloHead(((10.0, 14.0), (23.0, 27.0)), 3)
  raw = rng.randn(1, 2, 3, 2, 8).astype(np.float32)     # H=2, W=3, 2 anchors, 5 + 3
  boxes, obj, cls = yolov3.decode([jnp.asarray(raw)], [head], (64, 96))
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  n = 0
  for y in range(2):
    for x in range(3):
      for a in range(2):
        t = raw[0, y, x, a]
        expect = [(sig(t[0]) + x) / 3, (sig(t[1]) + y) / 2,
                  np.exp(t[2]) * head.anchors[a][0] / 96, np.exp(t[3]) * head.anchors[a][1] / 64]
        np.testing.assert_allclose(boxes[0, n], expect, rtol=1e-5)
        np.testing.assert_allclose(obj[0, n], sig(t[4]), rtol=1e-5)
        np.testing.assert_allclose(cls[0, n], sig(t[5:]), rtol=1e-5)
        n += 1


def test_nms_and_top_person_match_a_direct_computation():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [21, 21, 30, 30],
                    [0, 0, 10, 10.5]], np.float64)
  scores = np.array([0.9, 0.95, 0.7, 0.6, 0.3])
  # IoU([1,1,11,11], [0,0,10,10]) = 81 / 119 > 0.4; ([20..30], [21..30]) = 81 / 100 > 0.4.
  np.testing.assert_allclose(yolov3.iou(boxes[1], boxes[:1]), [81 / 119])
  np.testing.assert_array_equal(yolov3.nms(boxes, scores, 0.4), [1, 2])
  # At 0.9 only box 4 goes: IoU with box 0 is 100 / 105.
  np.testing.assert_array_equal(yolov3.nms(boxes, scores, 0.9), [1, 0, 2, 3])
  # top_person: cxcywh relative -> net pixels, threshold, then the best after NMS.
  cxcywh = np.array([[0.5, 0.5, 0.25, 0.5], [0.2, 0.2, 0.1, 0.1]])
  best = yolov3.top_person(cxcywh, np.array([0.85, 0.95]), 0.8, 0.4, 100)
  np.testing.assert_allclose(best, [15, 15, 25, 25])
  assert yolov3.top_person(cxcywh, np.array([0.5, 0.7]), 0.8, 0.4, 100) is None


def test_letterbox_maps_back():
  img = Image.fromarray(np.random.RandomState(5).randint(0, 255, (100, 200, 3), np.uint8))
  boxed, transform = yolov3.letterbox(img, 416)
  scale, dx, dy = transform
  assert boxed.shape == (416, 416, 3) and (dx, dy) == (0, 104) and scale == pytest.approx(2.08)
  assert np.all(boxed[:dy] == 0.5) and np.all(boxed[dy + 208:] == 0.5)   # grey bars
  original = np.array([20.0, 10.0, 60.0, 50.0])
  net_box = np.array([20 * scale + dx, 10 * scale + dy, 60 * scale + dx, 50 * scale + dy])
  np.testing.assert_allclose(yolov3.unletterbox(net_box, transform, img.size), original)
  np.testing.assert_allclose(yolov3.unletterbox(np.array([-5.0, 0, 500, 400]), transform,
                                                img.size), [0, 0, 200, 100])   # clipped


def _confident_head_params(cfg):
  """Weights whose second head says "person" with objectness ~1 for anchor 0 everywhere."""
  params = _random_params(cfg, seed=6)
  head = params["conv_11"]
  head["kernel"][:] = 0
  bias = np.full(14, -10.0, np.float32)
  bias[:4] = 0.0           # anchor 0: tx = ty = tw = th = 0
  bias[4] = 10.0           # objectness
  bias[5] = 10.0           # class 0: person
  head["bias"] = bias
  params["conv_5"]["kernel"][:] = 0
  params["conv_5"]["bias"] = np.full(14, -10.0, np.float32)
  return params


def test_converter_attaches_yolov3_boxes(cfg, synthetic_data, tmp_path):
  raw, _ = synthetic_data
  cfg_path = tmp_path / "tiny.cfg"
  cfg_path.write_text(TINY_CFG)
  weights = tmp_path / "tiny.weights"
  formats.darknet_weights(str(weights), _confident_head_params(cfg), cfg)
  out = tmp_path / "out"
  args = ["--source", "split_tree", "--root", raw, "--name", "det", "--out", str(out),
          "--person_boxes", f"yolov3:{cfg_path},{weights}", "--yolo_size", "0", "--workers", "1",
          "--no_progress", "--no_tfds_metadata", "--splits", "test"]
  assert convert_command.main(args) == 0
  saved = json.load(open(out / convert.DETECTIONS_FILE))
  assert saved["with_person"] == 16 and saved["without_person"] == 0
  # Cell (0, 0), anchor 0 (4 x 6 net pixels) centred at (0.5, 0.5) of the 32-px net input;
  # the 48-px images are letterboxed at scale 2/3 with no offset.
  for rel, box in saved["boxes"].items():
    np.testing.assert_allclose(box, [0, 0, 2.5 * 1.5, 3.5 * 1.5], atol=1e-3)
  source = ip.ShardSource(str(out), "test")
  recs = [records.parse(source[i]) for i in range(len(source))]
  assert all(r["has_person"] == 1 for r in recs)
  np.testing.assert_allclose(recs[0]["person_box"], [0, 0, 3.5 * 1.5 / 48, 2.5 * 1.5 / 48],
                             atol=1e-5)
  # A confidence above what the net gives: no person anywhere.
  out2 = tmp_path / "out2"
  args2 = [a if a != str(out) else str(out2) for a in args] + ["--yolo_conf", "0.99999"]
  assert convert_command.main(args2) == 0
  assert json.load(open(out2 / convert.DETECTIONS_FILE))["with_person"] == 0
  missing = [a if not a.startswith("yolov3:") else f"yolov3:{cfg_path},{tmp_path}/nope"
             for a in args]
  with pytest.raises(FileNotFoundError, match="the YOLOv3 weights file .*nope does not exist"):
    convert_command.main(missing)


def test_detector_input_size(cfg):
  detector = yolov3.PersonDetector(cfg, _random_params(cfg), size=64, batch_size=3)
  assert detector.batch_size % len(jax.local_devices()) == 0
  boxes, obj, cls = detector.detect_arrays(np.zeros((3, 64, 64, 3), np.float32))
  assert boxes.shape == (3, 32 * 32 * 2 + 64 * 64 * 2, 4) and obj.shape == boxes.shape[:2]
  assert cls.shape == boxes.shape[:2] + (2,)
  with pytest.raises(ValueError, match="not a multiple of 32"):
    yolov3.PersonDetector(cfg, _random_params(cfg), size=100)


def test_person_rules_on_hand_set_outputs():
  # Three detections: objectness 0.9 with P(person) 0.6 the top class (the reference keeps
  # it, the product 0.54 does not); objectness 0.9 with a dog the top class; objectness 0.7.
  obj = np.array([0.9, 0.9, 0.7])
  cls = np.array([[0.6, 0.3], [0.4, 0.95], [0.99, 0.0]])
  keep, score = yolov3.person_detections(obj, cls, 0.8, "reference")
  assert keep.tolist() == [True, False, False]
  np.testing.assert_allclose(score, [0.54, 0.36, 0.693])
  keep, _ = yolov3.person_detections(obj, cls, 0.5, "product")
  assert keep.tolist() == [True, False, True]
  with pytest.raises(ValueError, match="person rule 'max'"):
    yolov3.person_detections(obj, cls, 0.8, "max")


@pytest.mark.parametrize("rule, found", [("reference", 1), ("product", 0)])
def test_detector_rules_on_a_network_whose_outputs_are_set(cfg, rule, found):
  """The head's biases fix every output: objectness sigmoid(10) ~ 1 for anchor 0 of the
  second head, person logit 0.5 (P 0.62) above the other class's -10: person is the top class
  with objectness x P(person) = 0.62 < 0.8."""
  params = _confident_head_params(cfg)
  params["conv_11"]["bias"][5] = 0.5
  detector = yolov3.PersonDetector(cfg, params, conf=0.8, size=32, rule=rule)
  boxes = detector([Image.new("RGB", (48, 48), (90, 90, 90))])
  assert sum(b is not None for b in boxes) == found

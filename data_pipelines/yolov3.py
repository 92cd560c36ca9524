"""YOLOv3 in Flax from Darknet's own files: the `.cfg` network description and the `.weights`
arrays (docs/method.md §6: the person detector of the conversion tool).

  cfg = yolov3.parse_cfg(open("yolov3.cfg").read())
  net = yolov3.Darknet.from_cfg(cfg)
  params = yolov3.load_weights("yolov3.weights", cfg)
  detector = yolov3.PersonDetector(net, params)          # jitted, batched
  boxes = detector(list_of_pil_images)                    # [x1, y1, x2, y2] pixels or None

Layers built as the cfg says: [convolutional] (batch_normalize, filters, size, stride, pad,
activation leaky | linear), [shortcut] (from, linear), [route] (layers: one or several,
relative or absolute), [upsample] (stride, nearest), [yolo] (mask, anchors, classes).
Weights file: a header (int32 major, minor, revision; then `seen` as int64 when
major * 10 + minor >= 2, else int32), then for each convolutional layer in order: with batch
norm, its biases, scales, rolling means and variances, else the conv biases; then the kernel
(filters x channels x size x size). A file whose size does not match the cfg is refused with
the layer where it stops fitting.

Inference: letterbox to the net size (aspect kept, grey 0.5 padding, centred), forward and box
decoding jitted on device, batched over every local device; then on the host the person
detections are kept by one of two rules (`PERSON_RULES`), non-maximum suppression (IoU 0.4)
ranks them by objectness x P(person), and the top box is mapped back to the original image's
pixels:
  reference  objectness >= conf (0.8) and person the top class of the detection: the
             reference implementation's reading (the default)
  product    objectness x P(person) >= conf: stricter, keeps fewer person crops
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

BN_EPS = 1e-5
LEAKY_SLOPE = 0.1
PERSON = 0                       # COCO class index
PERSON_RULES = ("reference", "product")


def person_detections(objectness: np.ndarray, class_probs: np.ndarray, conf: float,
                      rule: str = "reference"):
  """(kept mask, ranking score) of detections [..., N] by `rule` (module docstring)."""
  person = objectness * class_probs[..., PERSON]
  if rule == "reference":
    keep = (objectness >= conf) & (np.argmax(class_probs, axis=-1) == PERSON)
  elif rule == "product":
    keep = person >= conf
  else:
    raise ValueError(f"person rule {rule!r}: choose one of {PERSON_RULES}")
  return keep, person


# --- the cfg ------------------------------------------------------------------------------


def parse_cfg(text: str, path: str = "cfg") -> List[Dict[str, str]]:
  """Darknet cfg text -> sections [{"type": "net" | "convolutional" | ..., option: value}]."""
  sections: List[Dict[str, str]] = []
  for n, raw in enumerate(text.splitlines(), 1):
    line = raw.split("#")[0].strip()
    if not line:
      continue
    if line.startswith("["):
      if not line.endswith("]"):
        raise ValueError(f"{path}:{n}: malformed section header {raw!r}")
      sections.append({"type": line[1:-1].strip()})
    elif "=" in line:
      if not sections:
        raise ValueError(f"{path}:{n}: option before any [section]: {raw!r}")
      key, value = line.split("=", 1)
      sections[-1][key.strip()] = value.strip()
    else:
      raise ValueError(f"{path}:{n}: expected key=value, got {raw!r}")
  if not sections or sections[0]["type"] not in ("net", "network"):
    raise ValueError(f"{path}: the first section must be [net]")
  known = {"net", "network", "convolutional", "shortcut", "route", "upsample", "yolo"}
  for i, s in enumerate(sections[1:]):
    if s["type"] not in known:
      raise ValueError(f"{path}: layer {i} is a [{s['type']}], which this YOLOv3 does not "
                       f"support (supported: {sorted(known - {'net', 'network'})})")
  return sections


@dataclasses.dataclass(frozen=True)
class YoloHead:
  anchors: Tuple[Tuple[float, float], ...]     # (w, h) in net input pixels
  classes: int


def _ints(value: str) -> List[int]:
  return [int(v) for v in value.split(",") if v.strip()]


def _route_sources(layer: Dict[str, str], i: int) -> List[int]:
  return [v if v >= 0 else i + v for v in _ints(layer["layers"])]


def channels_and_heads(cfg: Sequence[Dict[str, str]]):
  """(input channels of every conv layer, output channels of every layer, yolo heads)."""
  net = cfg[0]
  channels = int(net.get("channels", 3))
  outs: List[int] = []
  conv_in: Dict[int, int] = {}
  heads: Dict[int, YoloHead] = {}
  for i, layer in enumerate(cfg[1:]):
    kind = layer["type"]
    prev = outs[-1] if outs else channels
    if kind == "convolutional":
      conv_in[i] = prev
      outs.append(int(layer["filters"]))
    elif kind == "route":
      srcs = _route_sources(layer, i)
      if any(not 0 <= s < i for s in srcs):
        raise ValueError(f"route layer {i}: layers={layer['layers']} points outside 0..{i - 1}")
      outs.append(sum(outs[s] for s in srcs))
    elif kind == "yolo":
      mask = _ints(layer["mask"])
      pairs = _ints(layer["anchors"])
      anchors = [(float(pairs[2 * m]), float(pairs[2 * m + 1])) for m in mask]
      classes = int(layer["classes"])
      if prev != len(mask) * (5 + classes):
        raise ValueError(f"yolo layer {i}: its input has {prev} channels, expected "
                         f"{len(mask)} anchors x (5 + {classes} classes)")
      heads[i] = YoloHead(tuple(anchors), classes)
      outs.append(prev)
    else:   # shortcut, upsample
      outs.append(prev)
  return conv_in, outs, heads


# --- the network --------------------------------------------------------------------------


class Darknet(nn.Module):
  """The network a cfg describes. `apply(params, images [B, H, W, 3] in [0, 1])` -> the raw
  output of each [yolo] layer, [B, H_k, W_k, anchors, 5 + classes], in cfg order. Parameters
  are named `conv_{i}` after the cfg layer index (kernel, bias; or kernel + bn_scale,
  bn_bias, bn_mean, bn_var)."""
  layers: Tuple[Tuple[Tuple[str, str], ...], ...]    # the cfg sections after [net], as pairs

  @classmethod
  def from_cfg(cls, cfg: Sequence[Dict[str, str]]) -> "Darknet":
    channels_and_heads(cfg)        # validates the wiring before anything is built
    return cls(tuple(tuple(sorted(layer.items())) for layer in cfg[1:]))

  @nn.compact
  def __call__(self, x: jax.Array) -> List[jax.Array]:
    cfg = [{"type": "net"}] + [dict(layer) for layer in self.layers]
    _, _, heads = channels_and_heads(cfg)
    outputs: List[jax.Array] = []
    results = []
    for i, layer in enumerate(cfg[1:]):
      kind = layer["type"]
      if kind == "convolutional":
        x = _Conv(int(layer["filters"]), int(layer["size"]), int(layer.get("stride", 1)),
                  int(layer.get("pad", 0)), bool(int(layer.get("batch_normalize", 0))),
                  layer.get("activation", "linear"), name=f"conv_{i}")(x)
      elif kind == "shortcut":
        src = int(layer["from"])
        x = x + outputs[i + src if src < 0 else src]
        if layer.get("activation", "linear") != "linear":
          raise ValueError(f"shortcut layer {i}: activation {layer['activation']!r} "
                           "is not supported")
      elif kind == "route":
        x = jnp.concatenate([outputs[s] for s in _route_sources(layer, i)], axis=-1)
      elif kind == "upsample":
        s = int(layer.get("stride", 2))
        x = jnp.repeat(jnp.repeat(x, s, axis=1), s, axis=2)
      elif kind == "yolo":
        head = heads[i]
        b, h, w, _ = x.shape
        results.append(x.reshape(b, h, w, len(head.anchors), 5 + head.classes))
      outputs.append(x)
    return results


class _Conv(nn.Module):
  filters: int
  size: int
  stride: int
  pad: int
  batch_norm: bool
  activation: str

  @nn.compact
  def __call__(self, x):
    padding = self.size // 2 if self.pad else 0
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.size, self.size, x.shape[-1], self.filters))
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.batch_norm:
      f = self.filters
      scale = self.param("bn_scale", nn.initializers.ones, (f,))
      bias = self.param("bn_bias", nn.initializers.zeros, (f,))
      mean = self.param("bn_mean", nn.initializers.zeros, (f,))
      var = self.param("bn_var", nn.initializers.ones, (f,))
      per_channel = lambda v: v.reshape(1, 1, 1, f)  # noqa: E731
      y = ((y - per_channel(mean)) / jnp.sqrt(per_channel(var) + BN_EPS) * per_channel(scale)
           + per_channel(bias))
    else:
      y = y + self.param("bias", nn.initializers.zeros, (self.filters,)).reshape(1, 1, 1, -1)
    if self.activation == "leaky":
      return jnp.where(y > 0, y, LEAKY_SLOPE * y)
    if self.activation == "linear":
      return y
    raise ValueError(f"convolutional activation {self.activation!r} is not supported "
                     "(leaky, linear)")


# --- the weights file -----------------------------------------------------------------------


def _conv_arrays(cfg, conv_in) -> List[Tuple[int, List[Tuple[str, Tuple[int, ...]]]]]:
  """For each conv layer in file order: (layer index, [(name, shape)] in file order)."""
  order = []
  for i, layer in enumerate(cfg[1:]):
    if layer["type"] != "convolutional":
      continue
    f, k, c = int(layer["filters"]), int(layer["size"]), conv_in[i]
    names = ([("bn_bias", (f,)), ("bn_scale", (f,)), ("bn_mean", (f,)), ("bn_var", (f,))]
             if int(layer.get("batch_normalize", 0)) else [("bias", (f,))])
    order.append((i, names + [("kernel", (f, c, k, k))]))
  return order


def _header_size(major: int, minor: int) -> int:
  return 20 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else 16


def load_weights(path: str, cfg: Sequence[Dict[str, str]],
                 cfg_path: str = "the cfg") -> Dict[str, Any]:
  """Darknet .weights -> Flax params of `Darknet.from_cfg(cfg)`; every float accounted for."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"YOLOv3 weights {path} do not exist")
  data = np.fromfile(path, dtype=np.uint8)
  if data.size < 12:
    raise ValueError(f"{path} is too short for a Darknet weights header ({data.size} bytes)")
  major, minor, _ = np.frombuffer(data[:12].tobytes(), "<i4")
  header = _header_size(int(major), int(minor))
  floats = np.frombuffer(data[header:].tobytes(), "<f4") if (data.size - header) % 4 == 0 \
      else None
  conv_in, _, _ = channels_and_heads(cfg)
  order = _conv_arrays(cfg, conv_in)
  expected = sum(int(np.prod(s)) for _, arrays in order for _, s in arrays)
  if floats is None or floats.size != expected:
    have = (data.size - header) / 4
    pos, where = 0, "after the last layer"
    for i, arrays in order:
      n = sum(int(np.prod(s)) for _, s in arrays)
      if pos + n > have:
        where = f"at cfg layer {i} ({arrays[-1][1][0]} filters)"
        break
      pos += n
    raise ValueError(f"{path} holds {have:g} floats after its {header}-byte header but "
                     f"{cfg_path} needs {expected}: the file runs out {where}"
                     if have < expected else
                     f"{path} holds {have:g} floats after its {header}-byte header but "
                     f"{cfg_path} needs {expected} ({have - expected:g} left over): the "
                     "weights belong to another cfg")
  params, pos = {}, 0
  for i, arrays in order:
    layer = {}
    for name, shape in arrays:
      n = int(np.prod(shape))
      value = floats[pos:pos + n].reshape(shape)
      pos += n
      layer[name] = value.transpose(2, 3, 1, 0) if name == "kernel" else value.copy()
    params[f"conv_{i}"] = layer
  return params


# --- boxes ----------------------------------------------------------------------------------


def decode(raw: Sequence[jax.Array], heads: Sequence[YoloHead], net_size: Tuple[int, int]):
  """YOLO outputs -> (boxes [B, N, 4] as (cx, cy, w, h) relative to the net input,
  objectness [B, N], class probabilities [B, N, C]) over every head, cell and anchor."""
  net_h, net_w = net_size
  boxes, obj, cls = [], [], []
  for out, head in zip(raw, heads):
    b, h, w, a, _ = out.shape
    gy, gx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    anchors = jnp.asarray(head.anchors, jnp.float32).reshape(1, 1, 1, a, 2)
    cx = (jax.nn.sigmoid(out[..., 0]) + gx[None, :, :, None]) / w
    cy = (jax.nn.sigmoid(out[..., 1]) + gy[None, :, :, None]) / h
    bw = jnp.exp(out[..., 2]) * anchors[..., 0] / net_w
    bh = jnp.exp(out[..., 3]) * anchors[..., 1] / net_h
    boxes.append(jnp.stack([cx, cy, bw, bh], axis=-1).reshape(b, -1, 4))
    obj.append(jax.nn.sigmoid(out[..., 4]).reshape(b, -1))
    cls.append(jax.nn.sigmoid(out[..., 5:]).reshape(b, h * w * a, -1))
  return jnp.concatenate(boxes, 1), jnp.concatenate(obj, 1), jnp.concatenate(cls, 1)


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
  """IoU of one [x1, y1, x2, y2] box with each of [N, 4]."""
  low, high = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
  inter = np.prod(np.clip(high - low, 0, None), axis=1)
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
  return inter / np.maximum(area(box) + area(others) - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Indices of the boxes kept by greedy non-maximum suppression, best first."""
  order = np.argsort(-scores, kind="stable")
  keep = []
  while order.size:
    best = order[0]
    keep.append(best)
    rest = order[1:]
    order = rest[iou(boxes[best], boxes[rest]) <= iou_threshold]
  return np.asarray(keep, np.int64)


def letterbox(img: Image.Image, size: int) -> Tuple[np.ndarray, Tuple[float, int, int]]:
  """[size, size, 3] float32 in [0, 1]: the image scaled to fit (aspect kept), centred on grey
  0.5; and (scale, dx, dy) to map boxes back."""
  w, h = img.size
  scale = min(size / w, size / h)
  nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
  resized = np.asarray(img.convert("RGB").resize((nw, nh), Image.BILINEAR), np.float32) / 255
  out = np.full((size, size, 3), 0.5, np.float32)
  dx, dy = (size - nw) // 2, (size - nh) // 2
  out[dy:dy + nh, dx:dx + nw] = resized
  return out, (scale, dx, dy)


def unletterbox(box_xyxy: np.ndarray, transform: Tuple[float, int, int],
                image_size: Tuple[int, int]) -> np.ndarray:
  """Net-input pixel box [x1, y1, x2, y2] -> the original image's pixels, clipped."""
  scale, dx, dy = transform
  w, h = image_size
  x1, y1, x2, y2 = box_xyxy
  out = np.asarray([(x1 - dx) / scale, (y1 - dy) / scale, (x2 - dx) / scale,
                    (y2 - dy) / scale], np.float64)
  return np.clip(out, 0, [w, h, w, h])


def top_person(boxes_cxcywh: np.ndarray, scores: np.ndarray, conf: float, nms_iou: float,
               net: int, keep: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
  """The most confident person box [x1, y1, x2, y2] in net pixels among the kept detections
  (`keep`, default: scores >= conf) after NMS, or None."""
  if keep is None:
    keep = scores >= conf
  if not keep.any():
    return None
  b = boxes_cxcywh[keep] * net
  xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2,
                   b[:, 1] + b[:, 3] / 2], axis=1)
  kept = nms(xyxy, scores[keep], nms_iou)
  return xyxy[kept[0]]


class PersonDetector:
  """Top person box per image: letterboxed host-side, forward + decode jitted and batched
  over the local devices, thresholds and NMS on the host."""

  def __init__(self, cfg: Sequence[Dict[str, str]], params: Dict[str, Any],
               conf: float = 0.8, nms_iou: float = 0.4, batch_size: int = 16,
               size: Optional[int] = None, rule: str = "reference"):
    """`size`: the square input side (the paper: 416); default the cfg's [net] width. The
    network is fully convolutional, so any multiple of its total stride (32) works."""
    net = cfg[0]
    if size is None:
      size = int(net.get("width", 416))
      if int(net.get("height", size)) != size:
        raise ValueError("only square inputs are supported: pass a size")
    if size % 32:
      raise ValueError(f"YOLOv3 input size {size} is not a multiple of 32")
    if rule not in PERSON_RULES:
      raise ValueError(f"--yolo_rule {rule!r}: choose one of {PERSON_RULES}")
    self.size = size
    self.conf, self.nms_iou, self.rule = conf, nms_iou, rule
    self.model = Darknet.from_cfg(cfg)
    _, _, heads = channels_and_heads(cfg)
    self.heads = [heads[i] for i in sorted(heads)]
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    self.params = jax.device_put(params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    heads_t = tuple(self.heads)
    size = self.size

    @jax.jit
    def detections(p, images):
      return decode(self.model.apply({"params": p}, images), heads_t, (size, size))
    self._fn = detections

  def detect_arrays(self, images: np.ndarray):
    """(boxes [B, N, 4] cxcywh relative, objectness [B, N], class probabilities [B, N, C])
    of letterboxed images."""
    n = images.shape[0]
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)
    padded[:n] = images
    boxes, obj, cls = self._fn(self.params, jax.device_put(padded, self._sharding))
    return np.asarray(boxes)[:n], np.asarray(obj)[:n], np.asarray(cls)[:n]

  def __call__(self, images: Sequence[Image.Image]) -> List[Optional[List[float]]]:
    out: List[Optional[List[float]]] = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      boxed = [letterbox(img, self.size) for img in chunk]
      boxes, obj, cls = self.detect_arrays(np.stack([b[0] for b in boxed]))
      for img, (_, transform), bx, ob, cl in zip(chunk, boxed, boxes, obj, cls):
        keep, scores = person_detections(ob, cl, self.conf, self.rule)
        best = top_person(bx, scores, self.conf, self.nms_iou, self.size, keep)
        out.append(None if best is None else
                   [float(v) for v in unletterbox(best, transform, img.size)])
    return out


# --- the conversion tool's use ----------------------------------------------------------------


def parse_spec(spec: str) -> Tuple[str, str]:
  """"yolov3:CFG,WEIGHTS" -> (cfg path, weights path)."""
  body = spec[len("yolov3:"):]
  parts = body.split(",")
  if len(parts) != 2 or not all(parts):
    raise ValueError(f"--person_boxes {spec!r}: expected yolov3:CFG,WEIGHTS")
  for p, what in zip(parts, ("cfg", "weights")):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"--person_boxes: the YOLOv3 {what} file {p} does not exist")
  return parts[0], parts[1]


def detect_files(paths: Dict[str, Union[str, Callable[[], bytes]]], cfg_path: str, weights_path: str, conf: float = 0.8,
                 nms_iou: float = 0.4, batch_size: int = 16, progress: bool = True,
                 size: Optional[int] = 416,
                 rule: str = "reference") -> Dict[str, Optional[List[float]]]:
  """{key: image path, or a function returning the encoded image} -> {key: top person box
  [x1, y1, x2, y2] pixels, or None}. An image that cannot be read gets None (the conversion
  reports it when it reads it)."""
  with open(cfg_path) as f:
    cfg = parse_cfg(f.read(), cfg_path)
  detector = PersonDetector(cfg, load_weights(weights_path, cfg, cfg_path), conf, nms_iou,
                            batch_size, size, rule)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  keys = sorted(paths)
  out: Dict[str, Optional[List[float]]] = {}
  bar = tqdm(total=len(keys), unit="img", desc="YOLOv3 persons", disable=not progress)
  for start in range(0, len(keys), detector.batch_size):
    chunk = keys[start:start + detector.batch_size]
    images, readable = [], []
    for k in chunk:
      try:
        source = paths[k] if isinstance(paths[k], str) else io.BytesIO(paths[k]())
        with Image.open(source) as img:
          images.append(img.convert("RGB"))
        readable.append(k)
      except (OSError, ValueError):
        out[k] = None
    for k, box in zip(readable, detector(images) if images else []):
      out[k] = box
    bar.update(len(chunk))
  bar.close()
  return out

"""`tf.train.Example` as protobuf message classes, without TensorFlow.

The schema of tensorflow/core/example/{feature,example}.proto is declared here through
protobuf's descriptor API, in a private descriptor pool (so it never clashes with
TensorFlow's own registration when both are loaded, as in the tests). Serialized bytes are
exactly TensorFlow's: the same package, message and field numbers.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Union

import numpy as np
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _field(msg, name, number, ftype, label=_F.LABEL_OPTIONAL, type_name=None, oneof=None):
  f = msg.field.add(name=name, number=number, type=ftype, label=label)
  if type_name:
    f.type_name = type_name
  if oneof is not None:
    f.oneof_index = oneof
  return f


def _build_pool() -> descriptor_pool.DescriptorPool:
  fd = descriptor_pb2.FileDescriptorProto(name="uniemox/tf_example.proto", package="tensorflow",
                                          syntax="proto3")
  for name, ftype in (("BytesList", _F.TYPE_BYTES), ("FloatList", _F.TYPE_FLOAT),
                      ("Int64List", _F.TYPE_INT64)):
    _field(fd.message_type.add(name=name), "value", 1, ftype, _F.LABEL_REPEATED)
  feature = fd.message_type.add(name="Feature")
  feature.oneof_decl.add(name="kind")
  for i, name in enumerate(("bytes_list", "float_list", "int64_list")):
    _field(feature, name, i + 1, _F.TYPE_MESSAGE,
           type_name=".tensorflow." + name.title().replace("_", ""), oneof=0)
  features = fd.message_type.add(name="Features")
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  _field(entry, "key", 1, _F.TYPE_STRING)
  _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.Feature")
  _field(features, "feature", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED,
         ".tensorflow.Features.FeatureEntry")
  _field(fd.message_type.add(name="Example"), "features", 1, _F.TYPE_MESSAGE,
         type_name=".tensorflow.Features")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fd)
  return pool


_POOL = _build_pool()
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))

Value = Union[bytes, str, int, float, Sequence, np.ndarray]


def serialize(features: Mapping[str, Value]) -> bytes:
  """A dict of values -> serialized `tf.train.Example`.

  bytes/str (or lists of them) become bytes_list; ints, bools and integer arrays int64_list;
  floats and float arrays float_list. An empty list is not allowed (its type is ambiguous).
  """
  ex = Example()
  for key, value in features.items():
    feat = ex.features.feature[key]
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if isinstance(values, np.ndarray):
      values = values.reshape(-1)
      kind = "int64" if values.dtype.kind in "iub" else "float"
      values = values.tolist()
    elif not len(values):
      raise ValueError(f"feature {key!r} is an empty list: its type is unknown")
    elif isinstance(values[0], (bytes, str)):
      kind = "bytes"
    elif isinstance(values[0], (bool, int, np.integer)):
      kind = "int64"
    else:
      kind = "float"
    if kind == "bytes":
      feat.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else v for v in values)
    elif kind == "int64":
      feat.int64_list.value.extend(int(v) for v in values)
    else:
      feat.float_list.value.extend(float(v) for v in values)
  # Deterministic: map entries sorted by key, so equal records are equal bytes in any process.
  return ex.SerializeToString(deterministic=True)


def parse(data: bytes) -> Dict[str, list]:
  """Serialized `tf.train.Example` -> {key: list of values} (bytes, int or float)."""
  ex = Example()
  ex.ParseFromString(data)
  out = {}
  for key, feat in ex.features.feature.items():
    kind = feat.WhichOneof("kind")
    out[key] = list(getattr(feat, kind).value) if kind else []
  return out

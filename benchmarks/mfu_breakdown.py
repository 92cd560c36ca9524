r"""Where the pretraining step spends its time on a TPU slice, by the TPU compiler's own count
(issue: the path to 40% MFU). The step is compiled unrolled for a named slice on this CPU host
(`uniemox_jax.aot`, libtpu). Each top-level operation of the optimized program is assigned to
a part of the step, read from the JAX name stack in its metadata. The parts are the teacher,
the student's encoder, decoder and fusion (forward and backward), the masking and random
bits, the losses, and the optimizer. For each part the table gives:
- the compiler's estimated cycles (`estimated_cycles` in each op's backend config);
- the matmul (convolution) FLOPs counted from the fused computations' shapes;
- the bytes its operations read and write.
A part whose cycles are large beside its FLOPs is memory-bound.

  python benchmarks/mfu_breakdown.py --vit B/16 --topology v5e:2x2 --per_chip 64

These are estimates of the compiler's cost model, not measurements. A part's time is its
cycles at the clock the chip's peak implies (aot.CLOCK_GHZ, or --clock_ghz), one op after another.
Ops that overlap, the asynchronous copies and collectives, carry no cycles.
"""
import argparse
import ast
import collections
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import pretrain as pretrain_config  # noqa: E402
from uniemox_jax import aot  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\((.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id"}


def part(op_name: str) -> str:
  """The part of the step an operation belongs to, from its JAX name stack."""
  backward = "transpose(" in op_name
  for key, name in (("ClipVisionTower", "teacher"), (r"UniEmoX\)+/encoder", "encoder"),
                    (r"UniEmoX\)+/decoder", "decoder"), (r"UniEmoX\)+/fuse", "fusion module")):
    if re.search(key, op_name):
      return f"{name} {'backward' if backward else 'forward'}" if name != "teacher" else name
  if re.search(r"threefry|_uniform|argsort|random", op_name):
    return "random bits, masking order"
  if "UniEmoX" in op_name:
    return f"student glue (patches, gathers) {'backward' if backward else 'forward'}"
  if "jvp(" in op_name or "transpose(jvp(" in op_name or "Objective" in op_name:
    return "losses"
  if op_name:
    return "optimizer and update"
  return "unattributed (copies, layouts)"


def analyse(hlo: str):
  """{part: [ops, estimated cycles, matmul FLOPs, bytes]} over the entry computation's
  operations; an operation's FLOPs are those of the computations it calls, nested ones too
  (the TPU compiler fuses matmuls into fusions inside collective fusions)."""
  types, own, children, entry = {}, collections.defaultdict(float), collections.defaultdict(
      list), []
  computation = None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
    if header:
      computation = "ENTRY" if header.group(1) else header.group(2)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, type_text, opcode, rest = m.groups()
    types[name] = type_text
    calls = re.findall(r"calls=%([\w.\-]+)", rest)
    if computation == "ENTRY":
      entry.append((name, type_text, opcode, rest, calls))
    else:
      children[computation] += calls
    if opcode == "convolution":
      own[computation] += _conv_flops(type_text, rest, types)
    elif opcode == "dot":
      own[computation] += _dot_flops(type_text, rest, types)

  @functools.lru_cache(maxsize=None)
  def flops(computation: str) -> float:
    return own[computation] + sum(flops(c) for c in children[computation])

  parts = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])
  for name, type_text, opcode, rest, calls in entry:
    if opcode in _FREE:
      continue
    op_name = re.search(r'op_name="([^"]*)"', rest)
    row = parts[part(op_name.group(1).replace("jit(wrapped)/", "", 1) if op_name else "")]
    cycles = re.search(r'"estimated_cycles":"(\d+)"', rest)
    operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
    row[0] += 1
    row[1] += float(cycles.group(1)) if cycles else 0.0
    row[2] += sum(flops(c) for c in calls) + (_conv_flops(type_text, rest, types)
                                               if opcode == "convolution" else 0.0)
    row[3] += aot.shape_bytes(type_text) + sum(aot.shape_bytes(types.get(o, ""))
                                                for o in operands)
  return dict(parts)


def _dims(type_text: str):
  found = _SHAPE.findall(type_text)
  return [int(d) for d in found[0][1].split(",") if d] if found else []


def _conv_flops(type_text: str, rest: str, types) -> float:
  """2 x (output batch x output features x the kernel's input features) x, per window
  dimension, the (output position, window tap) pairs that meet a real input element: not
  padding, not a hole of lhs_dilate. The TPU compiler writes batched matmuls as convolutions
  whose windows carry batch dimensions (lhs_dilate, padding with reversal); counting the taps
  that meet data counts their FLOPs as the matmul has them."""
  operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
  if len(operands) < 2 or not labels:
    return 0.0
  lhs, kernel, out = (_dims(types.get(operands[0], "")), _dims(types.get(operands[1], "")),
                      _dims(type_text))
  lhs_labels, kernel_labels, out_labels = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", rest)
  fields = dict(f.split("=", 1) for f in window.group(1).split() if "=" in f) if window else {}
  spatial = sorted(c for c in out_labels if c.isdigit())

  def per_dim(key, default):
    values = fields.get(key, "")
    return [v for v in values.split("x") if v] or [default] * len(spatial)
  total = 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[
      kernel_labels.index("i")]
  for k, name in enumerate(spatial):
    size_in, size_out = lhs[lhs_labels.index(name)], out[out_labels.index(name)]
    taps = kernel[kernel_labels.index(name)]
    stride, lhs_dilate, rhs_dilate = (int(per_dim(f, "1")[k]) for f in
                                      ("stride", "lhs_dilate", "rhs_dilate"))
    low = int(per_dim("pad", "0_0")[k].split("_")[0])
    position = (np.arange(size_out)[:, None] * stride + np.arange(taps)[None, :] * rhs_dilate
                - low)
    total *= np.count_nonzero((position >= 0) & (position <= (size_in - 1) * lhs_dilate)
                              & (position % lhs_dilate == 0))
  return total


def _dot_flops(type_text: str, rest: str, types) -> float:
  operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  lhs = _dims(types.get(operands[0], "")) if operands else []
  if not lhs or not contracting:
    return 0.0
  k = np.prod([lhs[int(i)] for i in contracting.group(1).split(",") if i])
  return 2.0 * np.prod(_dims(type_text)) * k


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vit", default="B/16")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--per_chip", type=int, default=64)
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--set", action="append", default=[],
                 help="a config override FIELD=VALUE (Python literal), repeatable")
  p.add_argument("--clock_ghz", type=float, default=0.0,
                 help="the clock that turns the ops' cycles into time (default: aot.CLOCK_GHZ)")
  p.add_argument("--hlo", default="", help="also write the optimized program's text here")
  args = p.parse_args()
  config = pretrain_config.get_config(f"vit={args.vit}")
  config.batch_size = args.per_chip * len(aot.topology_devices(args.topology))
  config.mesh.fsdp = args.fsdp
  config.model.scan, config.teacher.scan = False, False   # loops would count once
  for item in args.set:
    field, value = item.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass                     # a plain string
    try:
      functools.reduce(lambda node, key: node[key], field.split("."), config)
    except (KeyError, TypeError):
      p.error(f"--set {item}: the config has no field {field!r}")
    config.update_from_flattened_dict({field: value})
  report = aot.compile_step(config, args.topology)
  print(report.summary())
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(report.hlo)
  parts = analyse(report.hlo)
  cycles = sum(r[1] for r in parts.values())
  flops = sum(r[2] for r in parts.values())
  peak = report.peak_tflops * 1e12
  clock = args.clock_ghz or aot.CLOCK_GHZ.get(args.topology.split(":")[0], 0.0)
  # A part's time: its cycles at the clock; without one, its share of the report's estimate.
  seconds = ((lambda c: c / (clock * 1e9)) if clock else
             (lambda c: report.seconds * c / cycles if cycles else float("nan")))
  print(f"\n{args.vit} pretraining step, {args.per_chip} per chip on {args.topology}, "
        f"mesh {report.mesh}{' ' + ' '.join(args.set) if args.set else ''}: the compiler's "
        "estimated cycles per part" + (f" (ms at {clock:g} GHz)" if clock else
                                       " (ms: their share of the report's step time)")
        + ", an estimate, not a measurement\n")
  print("| part | ops | Mcycles | share | est. ms | matmul TFLOP | MFU of the part | GiB moved |")
  print("|---|---|---|---|---|---|---|---|")
  for name, (ops, c, f, b) in sorted(parts.items(), key=lambda kv: -kv[1][1]):
    t = seconds(c)
    mfu = f / t / peak if t > 0 else float("nan")
    print(f"| {name} | {ops} | {c / 1e6:.1f} | {100 * c / cycles:.1f}% | {t * 1e3:.2f} | "
          f"{f / 1e12:.3f} | {100 * mfu:.0f}% | {b / aot.GIB:.2f} |")
  print(f"\ncounted matmul FLOPs {flops / 1e12:.3f} T per chip per step (analytic "
        f"{report.analytic_flops / 1e12:.3f} T, the compiler's {report.compiler_flops / 1e12:.3f}"
        f" T)")
  if clock:
    serial = cycles / (clock * 1e9)
    print(f"the ops' cycles one after another at {clock:g} GHz: {serial * 1e3:.1f} ms, "
          f"{args.per_chip / serial:.0f} images/s per chip, MFU "
          f"{100 * report.analytic_flops / serial / peak:.1f}% (no overlap; an estimate); "
          f"the report's: {report.seconds * 1e3:.1f} ms ({report.estimate})")


if __name__ == "__main__":
  main()

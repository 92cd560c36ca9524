"""A task's real train step compiled for a TPU slice that is not here, on a CPU host.

libtpu (the `tpu` extra) compiles for a named slice ("v5e:2x2", "v4:2x2x1", "v5p:2x2x1", ...)
without a TPU: `jax.experimental.topologies` gives the slice's devices, the config's mesh is
laid over them, and the same `trainer.StepProgram` a run jits is lowered with the state, the
task's constants and a batch as shapes, then compiled by the TPU compiler. What it reports is
the compiler's: per-chip memory against the chip's HBM, the collectives by kind and bytes,
and its cost model's step time, from which images/s per chip and MFU (the analytic FLOPs of
`uniemox_jax.flops` over the chip's peak) follow. The cost model is an estimate, not a
measurement; for some programs it gives a negative time: the estimate is then the roofline of
the compiler's FLOP and byte counts (the slower of FLOPs over the peak and bytes over HBM
bandwidth), and the report says which it is. Both count a while loop's body once (a scanned
stack, windowed einsums): a program with such loops gets its time from its unrolled twin (the
same config with `model.scan` and `teacher.scan` off, compiled for the time alone:
`unrolled_twin=True`), else no time at all.

  report = aot.compile_step(config, "v5e:2x2")
  print(report.summary())

Needs no data and no weights: the teacher's image tower is built from its architecture
(`loading.teacher_shapes`), and the pretraining batch carries text embeddings, as data
converted with --text_embeddings does.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from uniemox_jax import errors
from uniemox_jax import executables
from uniemox_jax import finetune
from uniemox_jax import flops
from uniemox_jax import optim
from uniemox_jax import pretrain
from uniemox_jax import sharding
from uniemox_jax import trainer
from uniemox_jax.teacher import loading

GIB = 1024 ** 3
# Per chip, from the public spec sheets: HBM (GiB), peak bf16 dense TFLOP/s, HBM GB/s.
CHIPS = {"v4": (32, 275, 1228), "v5e": (16, 197, 819), "v5p": (95, 459, 2765),
         "v6e": (32, 918, 1640)}
# TensorCore clocks (GHz) the chips' peaks imply, peak / (MXUs x 128 x 128 x 2 FLOPs) (v4: 2
# cores x 4 MXUs, 275 TFLOP/s: its published 1.05; v5e: 1 x 4, 197; v5p: 2 x 4, 459): the
# clock that turns the compiler's per-op cycle estimates into time.
CLOCK_GHZ = {"v4": 1.05, "v5e": 1.5, "v5p": 1.75}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass
class Report:
  """What the TPU compiler says of one step; `summary()` prints it."""
  topology: str
  chips: int
  task: str
  variant: str
  per_chip_batch: int
  mesh: Dict[str, int]
  hbm_bytes: int
  peak_bytes: int                 # the larger: the compiler's peak, or arguments + outputs -
  #                                 aliased + temporaries + code
  memory: Dict[str, int]
  collectives: Dict[str, Tuple[int, int]]    # kind -> (count, bytes of their results)
  compiler_flops: float           # per chip, XLA's count (while loop bodies once)
  bytes_accessed: float
  cost_model_s: float             # the cost model's step time (<= 0: it gave none)
  analytic_flops: float           # per chip per step, `uniemox_jax.flops`
  peak_tflops: float
  hbm_gb_s: float
  lower_s: float
  compile_s: float
  loops: int = 0                  # while loops (their bodies count once)
  time_from: str = ""             # "": this program's counts; else the program that gave them
  # The ops' estimated cycles, one after another, each loop body times its trip count (`cycles`),
  # and the loops whose trip count the program's text did not give (counted once).
  cycles: float = 0.0
  unknown_trips: int = 0
  hlo: str = dataclasses.field(default="", repr=False)   # the optimized program, as text

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def roofline_s(self) -> float:
    """The compiler's FLOP and byte counts over the chip's peak and HBM bandwidth, the slower
    of the two: the estimate when the cost model gives none."""
    return max(self.compiler_flops / (self.peak_tflops * 1e12),
               self.bytes_accessed / (self.hbm_gb_s * 1e9))

  @property
  def seconds(self) -> float:
    """The step time estimated: the cost model's, else the roofline's; for a program with
    loops whose time no unrolled twin gave, the ops' cycles with the loops at their trip
    counts (NaN where the chip's clock is not known)."""
    if self.loops and not self.time_from:
      return self.cycles_s
    return self.cost_model_s if self.cost_model_s > 0 else self.roofline_s

  @property
  def estimate(self) -> str:
    if self.loops and not self.time_from:
      if self.cycles_s > 0:
        return (f"the ops' cycles one after another, {self.loops} loops at their trip counts"
                + (f" ({self.unknown_trips} of unknown count, once)" if self.unknown_trips
                   else ""))
      return (f"no time estimate: {self.loops} while loops (scanned stacks, windowed einsums) "
              "whose bodies the compiler counts once; --unrolled_twin takes the time of the "
              "unrolled program")
    kind = "cost model" if self.cost_model_s > 0 else (
        f"roofline (the cost model gave {self.cost_model_s:.3g} s)")
    return f"{kind} of {self.time_from}" if self.time_from else kind

  @property
  def cycles_s(self) -> float:
    """The ops' cycles at the chip's clock: serial, so slower than any overlap the chip finds;
    with loops at their trip counts, an estimate a scanned program has too."""
    kind = self.topology.split(" ")[-1].split(":")[0].lower()
    if kind not in CLOCK_GHZ or not self.cycles:
      return float("nan")
    return self.cycles / (CLOCK_GHZ[kind] * 1e9)

  @property
  def images_per_s(self) -> float:
    """Per chip, by the estimate (`seconds`)."""
    return self.per_chip_batch / self.seconds if self.seconds > 0 else float("nan")

  @property
  def mfu(self) -> float:
    if not self.seconds > 0:
      return float("nan")
    return self.analytic_flops / self.seconds / (self.peak_tflops * 1e12)

  def summary(self) -> str:
    collectives = ", ".join(f"{kind} {n} ({b / 2**20:.1f} MiB)"
                            for kind, (n, b) in self.collectives.items() if n) or "none"
    time = f"  {self.estimate}" if not self.seconds > 0 else (
        f"  {self.estimate}, an estimate, not a measurement: step {self.seconds * 1e3:.3g} ms, "
        f"{self.images_per_s:.0f} images/s per chip, MFU {100 * self.mfu:.1f}% "
        f"({self.analytic_flops / 1e12:.3g} analytic TFLOP per chip per step over "
        f"{self.peak_tflops:.0f} TFLOP/s; the compiler counts {self.compiler_flops / 1e12:.3g})")
    serial = "" if not self.cycles_s > 0 or self.seconds == self.cycles_s else (
        f"\n  the ops' cycles one after another, loops at their trip counts (an estimate too): "
        f"step {self.cycles_s * 1e3:.3g} ms, MFU "
        f"{100 * self.analytic_flops / self.cycles_s / (self.peak_tflops * 1e12):.1f}%"
        + (f" ({self.unknown_trips} loops of unknown trip count counted once)"
           if self.unknown_trips else ""))
    return "\n".join([
        f"{self.task} {self.variant} on {self.topology} ({self.chips} chips, mesh "
        f"{self.mesh}), {self.per_chip_batch} images per chip",
        f"  memory per chip: {self.peak_bytes / GIB:.2f} GiB of {self.hbm_bytes / GIB:.0f} GiB"
        f" HBM: {'fits' if self.fits else 'DOES NOT FIT'} (arguments "
        f"{self.memory['argument'] / GIB:.2f}, temporaries {self.memory['temp'] / GIB:.2f})",
        f"  collectives: {collectives}", time + serial,
        f"  lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s"])

  def to_json(self) -> Dict[str, Any]:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hlo"}
    return dict(fields, fits=self.fits, seconds=self.seconds, cycles_s=self.cycles_s,
                estimate=self.estimate, roofline_s=self.roofline_s,
                images_per_s=self.images_per_s, mfu=self.mfu)


class CompileRefused(errors.UserError):
  """The TPU compiler refused the program (out of memory, an unsupported op): its reason."""


def chip(topology: str) -> Tuple[int, float, float]:
  """(HBM bytes, peak bf16 TFLOP/s, HBM GB/s) of a topology name's chip ("v5e:2x2": v5e's)."""
  kind = topology.split(":")[0].lower()
  if kind not in CHIPS:
    raise errors.UserError(f"--topology {topology}: a TPU slice such as v5e:2x2, v4:2x2x1, "
                           f"v5p:2x2x1 (chips: {', '.join(CHIPS)})")
  hbm, tflops, bandwidth = CHIPS[kind]
  return hbm * GIB, float(tflops), float(bandwidth)


def topology_devices(topology: str, num_slices: int = 1):
  """The compile-only devices of `num_slices` slices of `topology`, from libtpu: one per chip
  (v4 and v5p as megacore, as their VMs run)."""
  chip(topology)
  quiet_libtpu(topology)
  kind = topology.split(":")[0].lower()
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  if kind == "v4":
    kwargs["chip_config_name"] = "megacore"
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
      import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      hint = ""
    except ImportError:
      hint = " (libtpu is not installed: pip install -e '.[tpu]')"
    raise errors.UserError(f"--topology {topology}: libtpu cannot describe it: "
                           f"{text[:300]}{hint}") from None


def quiet_libtpu(topology: str) -> None:
  """libtpu used to compile only, on a host that is not a TPU VM: what it would ask the VM's
  metadata server is given (else it warns on every start), and several processes may load it
  at once (each compiles for itself; its lock file admits one by default)."""
  kind, _, shape = topology.lower().partition(":")
  chips = int(np.prod([int(d) for d in shape.split("x") if d.isdigit()] or [1]))
  accelerator = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}", "v4": f"v4-{2 * chips}",
                 "v5p": f"v5p-{2 * chips}"}.get(kind, "")
  for name, value in (("TPU_ACCELERATOR_TYPE", accelerator), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(name, value)


def step_task(config, mesh, workdir: str) -> trainer.Task:
  """The config's task as its step sees it (no data, no weights)."""
  if config.task == "pretrain":
    teacher = loading.teacher_shapes(config, workdir)
    return pretrain.step_task(config, mesh, teacher, teacher.embed_dim)
  if config.task == "finetune":
    if not config.num_classes:
      raise errors.UserError("config.num_classes=0 (the data decides it): set it, e.g. "
                             "--config.num_classes=8")
    return finetune.step_task(config, config.num_classes, bool(config.multi_label))
  raise errors.UserError(f"config.task={config.task!r}: pretrain or finetune")


def analytic_flops(config, teacher_config=None) -> float:
  """Training FLOPs per image of the config's step (`uniemox_jax.flops`)."""
  m = config.model
  if config.task == "finetune":
    return flops.classifier_per_image(m.variant, config.num_classes, m.image_size)
  return flops.per_image("uniemox", m.variant, mask_ratio=m.mask_ratio,
                         image_size=m.image_size, global_batch=config.batch_size,
                         teacher=teacher_config or flops.CLIP_B16,
                         decoder_depth=m.decoder.depth, decoder_width=m.decoder.width)


def shape_bytes(type_text: str) -> int:
  """The bytes of an HLO type's arrays ("bf16[8,197,768]{...}", or a tuple of them)."""
  return sum(_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_text))


def collectives(hlo: str) -> Dict[str, Tuple[int, int]]:
  """Collectives of an optimized HLO module: kind -> (count, bytes of their results). An
  asynchronous one is counted at its `-done`, whose result is the collective's."""
  found = {kind: [0, 0] for kind in COLLECTIVES}
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-done)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if m is None or re.search(r"(" + "|".join(COLLECTIVES) + r")-start\(", line):
      continue
    size = shape_bytes(m.group(1))
    found[m.group(2)][0] += 1
    found[m.group(2)][1] += size
  return {k: (n, b) for k, (n, b) in found.items()}


def _memory(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  out = {name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "alias", "temp", "generated_code")}
  # The larger of the compiler's own peak and every buffer it assigned live at once.
  out["peak"] = max(int(getattr(m, "peak_memory_in_bytes", 0) or 0),
                    out["argument"] + out["output"] - out["alias"] + out["temp"]
                    + out["generated_code"])
  return out


def _cost(compiled) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _refusal(e: BaseException) -> str:
  """A compiler error in one line: the line that says what went wrong."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  for line in lines:
    if re.search(r"error|out of memory|exceed|unsupported|unimplemented", line, re.I):
      return line[:400]
  return (lines[0] if lines else type(e).__name__)[:400]


def loops(hlo: str) -> int:
  """The while loops of an optimized HLO module that do matmuls: scanned stacks and windowed
  einsums, whose bodies the cost model counts once (the TPU compiler's text gives no trip
  counts). A loop without any, such as the rejection loop of a gamma sampler (mixup's beta
  draw), is left out: counted once, it is as cheap as it is."""
  computations = _computations(hlo)
  calls = {name: {n for line in lines for n in re.findall(r"%([\w.\-]+)", line)
                  if n in computations} for name, lines in computations.items()}
  matmul = {name for name, lines in computations.items()
            if any(re.search(r"\s(?:convolution|dot)\(", line) for line in lines)}

  def heavy(name, seen=()):
    return name in matmul or any(heavy(c, seen + (name,)) for c in calls.get(name, ())
                                 if c not in seen)
  bodies = re.findall(r"\swhile\(.*?body=%([\w.\-]+)", hlo)
  return sum(heavy(b) for b in bodies)


def _computations(hlo: str) -> Dict[str, List[str]]:
  """{computation name ("ENTRY" for the entry one): its instruction lines}."""
  out, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
    if header:
      current = out.setdefault("ENTRY" if header.group(1) else header.group(2), [])
    elif current is not None and line.strip().startswith(("%", "ROOT")):
      current.append(line)
  return out


def _defs(lines: Sequence[str]) -> Dict[str, str]:
  """{instruction name: the rest of its line} of a computation's lines."""
  return {m.group(1): m.group(2) for m in
          (re.match(r"\s*(?:ROOT\s+)?%(\S+) = (.*)", line) for line in lines) if m}


def _constant(text: Optional[str]) -> Optional[int]:
  m = re.match(r"[su]32\[\]\S* constant\((-?\d+)\)", text or "")
  return int(m.group(1)) if m else None


def _through_copies(defs: Dict[str, str], name: str) -> str:
  """The definition of `name`, or of what it copies (copies and bitcasts followed)."""
  while re.search(r" (?:copy|bitcast)\(%([\w.\-]+)\)", defs.get(name, "")):
    name = re.search(r" (?:copy|bitcast)\(%([\w.\-]+)\)", defs[name]).group(1)
  return defs.get(name, "")


def _step(defs: Dict[str, str], update: str, is_counter) -> Optional[int]:
  """The constant that `update` (an add) adds to the counter."""
  for a, b in re.findall(r"add\(%([\w.\-]+), %([\w.\-]+)\)", update):
    for counter, constant in ((a, b), (b, a)):
      if is_counter(counter) and _constant(_through_copies(defs, constant)) is not None:
        return _constant(_through_copies(defs, constant))
  return None


def trip_count(computations: Dict[str, List[str]], parent: str, init: str, condition: str,
               body: str) -> Optional[int]:
  """The trip count of the while loop in `parent` with initial tuple `init`, or None. Read as
  scans and the compiler's windowed einsums write their loops: the condition `counter < N`,
  the body's `counter + step` (fused or not), and the counter's start in the initial tuple
  (0 where that is not a constant)."""
  cond = _defs(computations.get(condition, []))
  root = next((v for v in cond.values() if " compare(" in v and "direction=LT" in v), "")
  m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\)", root)
  index = m and re.search(r"get-tuple-element\(%\S+\), index=(\d+)",
                          _through_copies(cond, m.group(1)))
  limit = m and _constant(_through_copies(cond, m.group(2)))
  if not index or limit is None:
    return None
  i = int(index.group(1))
  defs, lines = _defs(computations.get(body, [])), computations.get(body, [])
  root_line = next((line for line in lines if line.strip().startswith("ROOT")), "")
  outputs = re.findall(r"%([\w.\-]+)", root_line.split(" tuple(", 1)[-1])
  update = _through_copies(defs, outputs[i]) if " tuple(" in root_line and len(outputs) > i else ""
  step = _step(defs, update, lambda n: f"index={i}" in _through_copies(defs, n))
  fused = re.search(r" fusion\(%([\w.\-]+)\).*calls=%([\w.\-]+)", update)
  if step is None and fused and f"index={i}" in _through_copies(defs, fused.group(1)):
    inner = _defs(computations.get(fused.group(2), []))    # counter + step, fused
    step = _step(inner, "\n".join(inner.values()), lambda n: "parameter(" in inner.get(n, ""))
  parent_defs = _defs(computations.get(parent, []))
  starts = re.findall(r"%([\w.\-]+)", parent_defs.get(init, "").split(" tuple(", 1)[-1])
  start = _constant(_through_copies(parent_defs, starts[i])) if len(starts) > i else None
  if not step or step < 0:
    return None
  return max(0, -(-(limit - (start or 0)) // step))


def cycles(hlo: str) -> Tuple[float, int]:
  """(the estimated cycles of the entry computation's ops added up, a while loop's body counted
  its trip count times, nested loops too; how many loops had no trip count the text gives).
  Trip counts: `trip_count`."""
  computations = _computations(hlo)

  def total(name: str, seen: Tuple[str, ...] = ()) -> Tuple[float, int]:
    count, unknown = 0.0, 0
    for line in computations.get(name, []):
      loop = re.search(r"\swhile\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)",
                       line)
      if loop and loop.group(3) not in seen:
        n = trip_count(computations, name, *loop.groups())
        body, inner = total(loop.group(3), seen + (name,))
        count, unknown = count + (1 if n is None else n) * body, unknown + inner + (n is None)
        continue
      estimate = re.search(r'"estimated_cycles":"(\d+)"', line)
      count += float(estimate.group(1)) if estimate else 0.0
    return count, unknown
  return total("ENTRY")


def compile_step(config, topology: str, num_slices: int = 1, workdir: Optional[str] = None,
                 unrolled_twin: bool = False, write_step: Optional[str] = None) -> Report:
  """Compiles `config`'s train step for `num_slices` slices of `topology`; raises
  `CompileRefused` (one line) when the TPU compiler refuses it. With `unrolled_twin`, a
  program with loops takes its time estimate from the same step unrolled (compiled too).
  `write_step`: a file the executable is written to, for a run on that slice to load
  (config.compiled_step, `uniemox_jax.executables`)."""
  devices = topology_devices(topology, num_slices)
  with errors.as_user_errors():
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    if config.batch_size % len(devices):
      raise ValueError(f"config.batch_size={config.batch_size} does not divide over the "
                       f"{len(devices)} chips" + (f" of {num_slices} slices" if num_slices > 1
                                                  else f" of {topology}"))
    with tempfile.TemporaryDirectory() as tmp:
      task = step_task(config, mesh, workdir or tmp)
      # The schedule's lengths are constants of the program, not shapes: any will do for the
      # estimates, but a step written out for a run must be that run's (its data's size).
      schedule = optim.resolve_schedule(config, trainer.train_examples(config, workdir or tmp)
                                        if write_step else config.batch_size * 1000)
  program = trainer.StepProgram(config, mesh, task, schedule)
  per_chip = config.batch_size // len(devices)
  started = time.perf_counter()
  lowered = program.step.lower(*program.abstract_inputs())
  lower_s = time.perf_counter() - started
  started = time.perf_counter()
  # Not through JAX's persistent cache: a program compiled for devices that are not here
  # cannot be loaded back from it (and would only crowd it).
  with executables.no_persistent_cache():
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      raise CompileRefused(f"the TPU compiler refused the step for {topology} (per-chip "
                           f"batch {per_chip}): {_refusal(e)}") from None
  compile_s = time.perf_counter() - started
  if write_step:
    executables.write(write_step, compiled, lowered, list(mesh.devices.flat),
                      program.compiler_options)
  teacher = task.teacher.vision_config if task.teacher is not None else None
  report = report_of(compiled, topology=topology if num_slices == 1 else
                     f"{num_slices}x {topology}", chips=len(devices), task=config.task,
                     variant=config.model.variant,
                     per_chip_batch=per_chip, mesh=dict(mesh.shape),
                     analytic_flops=analytic_flops(config, teacher) * per_chip,
                     lower_s=lower_s, compile_s=compile_s)
  if report.loops and unrolled_twin and (config.model.scan or config.get("teacher", {}).get(
      "scan", False)):
    twin = config.copy_and_resolve_references()
    twin.model.scan = False
    if "teacher" in twin:
      twin.teacher.scan = False
    unrolled = compile_step(twin, topology, num_slices, workdir)
    if unrolled.loops:        # loops of the compiler's own (windowed einsums): no time either
      return report
    report = dataclasses.replace(
        report, cost_model_s=unrolled.cost_model_s, compiler_flops=unrolled.compiler_flops,
        bytes_accessed=unrolled.bytes_accessed,
        time_from=f"the unrolled twin (compiled in {unrolled.compile_s:.0f} s)")
  return report


def report_of(compiled, *, topology: str, **fields) -> Report:
  """The report of a program compiled for `topology` (any step: the benchmarks compile a
  plain MAE step beside ours); `fields` are the Report's that the program does not give."""
  hbm, peak_tflops, hbm_gb_s = chip(topology.split(" ")[-1])
  memory, cost, hlo = _memory(compiled), _cost(compiled), compiled.as_text()
  return Report(
      topology=topology, hbm_bytes=hbm, peak_bytes=memory["peak"],
      memory=memory, collectives=collectives(hlo),
      compiler_flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      cost_model_s=float(cost.get("optimal_seconds", 0.0)), peak_tflops=peak_tflops,
      hbm_gb_s=hbm_gb_s, loops=loops(hlo), hlo=hlo,
      **dict(zip(("cycles", "unknown_trips"), cycles(hlo))), **fields)


def search_batch(config, topology: str, num_slices: int = 1, largest: int = 1024,
                 log=print) -> Tuple[Optional[Report], Dict[int, str]]:
  """The largest per-chip batch, doubling from the config's up to `largest`, whose step
  compiles and fits: (its report or None, {per-chip batch tried: what happened})."""
  chips = len(topology_devices(topology, num_slices))
  per_chip = max(1, config.batch_size // chips)
  best, tried = None, {}
  while per_chip <= largest:
    trial = config.copy_and_resolve_references()
    trial.batch_size = per_chip * chips
    try:
      report = compile_step(trial, topology, num_slices)
    except CompileRefused as e:
      tried[per_chip] = str(e)
      log(f"per-chip batch {per_chip}: {e}")
      break
    tried[per_chip] = (f"{report.peak_bytes / GIB:.2f} GiB per chip, "
                       f"{'fits' if report.fits else 'does not fit'}")
    log(f"per-chip batch {per_chip}: {tried[per_chip]} (compiled in {report.compile_s:.0f} s)")
    if not report.fits:
      break
    best, per_chip = report, per_chip * 2
  return best, tried

"""The pod check: a task's real train step compiled by the TPU compiler (libtpu) for a named
slice on this CPU host, its printed numbers against the compiled program's own."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import environment

pytest.importorskip("libtpu", reason="libtpu (the tpu extra, which `make test` installs) "
                    "compiles for TPU slices")

from uniemox_jax import aot  # noqa: E402
from uniemox_jax import errors  # noqa: E402
from uniemox_jax import executables  # noqa: E402
from uniemox_jax import trainer  # noqa: E402
from uniemox_jax import pretrain  # noqa: E402
from uniemox_jax import sharding  # noqa: E402
from uniemox_jax import finetune  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny demo model at 8 images per chip: minutes of the TPU compiler become seconds.
DEMO = ["--config", "configs/demo.py:evals=False", "--config.batch_size=32"]


def _aot(*args, timeout=900):
  # The processes of both test workers load libtpu side by side: its lock file would refuse
  # the second, unless the tool allows it (aot.quiet_libtpu), as it does by default.
  env = {k: v for k, v in environment.subprocess_env().items()
         if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
  return subprocess.run([sys.executable, "-m", "uniemox_jax.tools.aot", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compiled_v5e(tmp_path_factory):
  """The pod check run as a user runs it (v5e:2x2, fsdp 4), and its JSON; the compiled step
  written out too (`--write_step`)."""
  out = tmp_path_factory.mktemp("aot") / "v5e.json"
  proc = _aot(*DEMO, "--config.mesh.fsdp=4", "--topology", "v5e:2x2", "--json", str(out),
              "--write_step", str(out.with_name("step.bin")))
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_the_command_prints_the_compilers_numbers(compiled_v5e):
  stdout, report = compiled_v5e
  assert report["chips"] == 4 and report["per_chip_batch"] == 8
  assert report["mesh"] == {"data": 1, "fsdp": 4}
  assert report["fits"] and 0 < report["peak_bytes"] < report["hbm_bytes"] == 16 * 2**30
  assert report["seconds"] > 0 and report["compiler_flops"] > 0 and report["bytes_accessed"] > 0
  if report["cost_model_s"] <= 0:     # the roofline of the compiler's counts stands in
    assert report["seconds"] == pytest.approx(max(report["compiler_flops"] / 197e12,
                                                  report["bytes_accessed"] / 819e9))
  assert report["images_per_s"] == pytest.approx(8 / report["seconds"])
  assert report["mfu"] == pytest.approx(
      report["analytic_flops"] / report["seconds"] / 197e12)
  # fsdp 4: the weights are gathered where they are used, the gradients reduce-scattered.
  assert report["collectives"]["all-gather"][0] > 0
  assert report["collectives"]["reduce-scatter"][0] + report["collectives"]["all-reduce"][0] > 0
  for line in ("on v5e:2x2 (4 chips", "GiB HBM: fits", "collectives: ", "an estimate, not a "
               "measurement", "compiled in"):
    assert line in stdout, stdout


def test_the_written_step_is_the_slices_and_other_devices_refuse_it(compiled_v5e, tmp_path):
  """The executable for v5e:2x2 says what it was compiled for; this host's run refuses it in
  one line, before loading any of it (the trainer's side: tests/test_trainer.py)."""
  stdout, report = compiled_v5e
  path = re.search(r"wrote the compiled step to (\S+) \(([\d.]+) MiB\): run with "
                   r"--config.compiled_step=(\S+)", stdout)
  assert path and path.group(1) == path.group(3), stdout
  record = executables.read(path.group(1))
  assert record["environment"]["platform"] == "tpu" and record["environment"]["devices"] == 4
  assert "v5" in record["environment"]["device_kind"].lower()
  assert record["environment"]["compiler_options"] == sharding.NO_WINDOWED_EINSUM
  assert len(record["payload"]) > 100_000
  lowered = jax.jit(lambda x: x + 1).lower(1.0)
  with pytest.raises(errors.UserError) as refused:
    executables.load(path.group(1), lowered, jax.devices(), {})
  message = str(refused.value)
  assert "\n" not in message and message.startswith(f"config.compiled_step={path.group(1)} "
                                                     "was compiled for platform 'tpu', this "
                                                     "run 'cpu'"), message
  assert "devices 4, this run 8" in message and "another program" in message
  # A wrong path, and a file of something else.
  with pytest.raises(errors.UserError, match=r"config.compiled_step=\S+nope: no such file"):
    executables.read(str(tmp_path / "nope"))
  (tmp_path / "other.bin").write_bytes(b"not a pickle")
  with pytest.raises(errors.UserError, match="is not a compiled step written by"):
    executables.read(str(tmp_path / "other.bin"))


def test_the_numbers_are_the_compiled_programs(compiled_v5e, tmp_path):
  """The same step compiled here, in this process: what the command printed is what the
  compiled object reports."""
  _, report = compiled_v5e
  from configs import demo
  config = demo.get_config("evals=False")
  config.batch_size, config.mesh.fsdp = 32, 4
  devices = aot.topology_devices("v5e:2x2")
  from uniemox_jax import sharding
  mesh = sharding.make_mesh(1, 4, devices=devices)
  task = aot.step_task(config, mesh, str(tmp_path))
  from uniemox_jax import optim
  program = trainer.StepProgram(config, mesh, task, optim.resolve_schedule(config, 32_000))
  assert {k: v.shape[0] for k, v in program.batch_shapes().items()} == \
      {k: 32 for k in task.example}
  with executables.no_persistent_cache():
    compiled = program.step.lower(*program.abstract_inputs()).compile()
  memory = compiled.memory_analysis()
  assert report["memory"]["temp"] == memory.temp_size_in_bytes
  assert report["memory"]["argument"] == memory.argument_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert report["cost_model_s"] == pytest.approx(cost["optimal_seconds"], rel=1e-6)
  assert report["bytes_accessed"] == pytest.approx(cost["bytes accessed"], rel=1e-6)
  assert report["compiler_flops"] == pytest.approx(cost["flops"], rel=1e-6)
  # The state's parameters are sharded over the 4 chips: each holds a quarter of the
  # largest (fsdp) arrays.
  sharded = [x for x in jax.tree.leaves(program.abstract_state["params"])
             if x.sharding.spec and any(x.sharding.spec)]
  assert sharded, "no parameter is sharded at fsdp 4"


def test_a_scanned_step_takes_its_time_from_its_unrolled_twin(compiled_v5e, tmp_path):
  """Scanned stacks are loops whose bodies the compiler counts once: without the twin no time
  is given; with it, the time is the unrolled program's (the fixture's), the memory its own."""
  scanned = [*DEMO, "--config.mesh.fsdp=4", "--topology", "v5e:2x2",
             "--config.model.scan=True", "--config.teacher.scan=True"]
  twin = _aot(*scanned, "--unrolled_twin", "--json", str(tmp_path / "twin.json"))
  assert twin.returncode == 0, twin.stdout + twin.stderr[-3000:]
  report, unrolled = json.loads((tmp_path / "twin.json").read_text()), compiled_v5e[1]
  assert report["loops"] >= 1 and unrolled["loops"] == 0     # the 2-block encoder at least
  assert report["time_from"].startswith("the unrolled twin")
  # The same scanned program without its twin: its own ops' cycles, each loop body times its
  # trip count, come near the unrolled program's (both serial sums of the compiler's
  # estimates; measured: 0.92 against 0.71 Mcycles here, the loops' own copies and slices
  # being a larger share of a 2-block model); without a clock for the chip, no time at all.
  fields = {f.name for f in dataclasses.fields(aot.Report)}
  alone = aot.Report(**dict({k: v for k, v in report.items() if k in fields}, time_from=""))
  assert alone.seconds == alone.cycles_s > 0 and alone.unknown_trips == 0
  assert "loops at their trip counts" in alone.summary(), alone.summary()
  assert alone.cycles == pytest.approx(unrolled["cycles"], rel=0.4), (alone.cycles,
                                                                       unrolled["cycles"])
  unclocked = dataclasses.replace(alone, topology="v6e:2x2")
  assert not unclocked.seconds > 0 and "no time estimate" in unclocked.summary()
  for key in ("cost_model_s", "compiler_flops", "bytes_accessed", "seconds", "mfu"):
    assert report[key] == pytest.approx(unrolled[key], rel=1e-6), key
  assert report["memory"]["temp"] != unrolled["memory"]["temp"]
  assert "of the unrolled twin" in twin.stdout, twin.stdout


def test_only_loops_that_do_matmuls_count():
  """A scanned matmul is a loop the cost model undercounts; a gamma sampler's rejection loops
  (mixup's beta draw) are not, and must not cost a fine-tuning step its time estimate."""
  def f(x, key):
    y, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, jnp.ones((3, 8, 8)))
    return y, jax.random.beta(key, 0.8, 0.8, (4,))
  hlo = jax.jit(f).lower(jnp.ones((2, 8)), jax.random.key(0)).compile().as_text()
  assert hlo.count(" while(") > 1 and aot.loops(hlo) == 1


def test_trip_counts_are_read_from_the_loops():
  """A scan of 3 and a while loop from 2 by 3 below 11 (3 trips), as XLA writes them."""
  def f(x):
    y, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, jnp.ones((3, 8, 8)))
    _, z = jax.lax.while_loop(lambda c: c[0] < 11, lambda c: (c[0] + 3, jnp.sin(c[1]) @ c[1]),
                              (2, y @ y.T))
    return z
  hlo = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
  computations = aot._computations(hlo)
  found = sorted(aot.trip_count(computations, name, *m.groups())
                 for name, lines in computations.items() for line in lines
                 for m in [re.search(r"\swhile\(%([\w.\-]+)\), condition=%([\w.\-]+), "
                                     r"body=%([\w.\-]+)", line)] if m)
  assert found == [3, 3], found


def test_finetuning_step_compiles_for_v4(tmp_path):
  proc = _aot("--config", "configs/demo_finetune.py", "--config.batch_size=16",
              "--topology", "v4:2x2x1", "--json", str(tmp_path / "v4.json"))
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  report = json.loads((tmp_path / "v4.json").read_text())
  assert report["task"] == "finetune" and report["chips"] == 4 and report["per_chip_batch"] == 4
  assert report["hbm_bytes"] == 32 * 2**30 and report["fits"]
  # Data parallel: the gradients are summed over the chips.
  assert report["collectives"]["all-reduce"][0] > 0


def test_the_tpu_compiler_gets_the_meshs_options(monkeypatch):
  """config.mesh.windowed_einsum=False (the default): the step is compiled with the TPU
  compiler's two options that turn windowed einsums off. libtpu takes their names (the
  module's other compiles) and refuses a name it does not know, which shows here that the
  options reach it. On the CPU, and with True, there are none: XLA:CPU refuses them."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  tpu = sharding.make_mesh(-1, 1, devices=aot.topology_devices("v5e:2x2"))
  assert sharding.compiler_options(tpu, False) == sharding.NO_WINDOWED_EINSUM
  assert sharding.compiler_options(tpu, True) == {}
  assert sharding.compiler_options(sharding.make_mesh(-1, 1), False) == {}
  config = demo.get_config("evals=False")
  config.batch_size = 32
  monkeypatch.setattr(sharding, "NO_WINDOWED_EINSUM",
                      {"xla_tpu_enable_windowed_einsum_for_all_gathr": False})
  with pytest.raises(aot.CompileRefused, match="No such compile option"):
    aot.compile_step(config, "v5e:2x2")


def test_refusals_are_one_line(tmp_path):
  bad_chip = _aot(*DEMO, "--topology", "v9z:2x2", timeout=300)
  assert bad_chip.returncode == 2
  assert bad_chip.stderr.strip().splitlines()[-1].startswith("error: --topology v9z:2x2"), \
      bad_chip.stderr
  bad_shape = _aot(*DEMO, "--topology", "v5e:3x7", timeout=300)
  assert bad_shape.returncode == 2, bad_shape.stderr[-2000:]
  last = bad_shape.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --topology v5e:3x7: libtpu cannot describe it"), last
  uneven = _aot(*DEMO, "--config.batch_size=30", "--topology", "v5e:2x2", timeout=300)
  assert uneven.returncode == 2
  assert "config.batch_size=30" in uneven.stderr.strip().splitlines()[-1], uneven.stderr


@pytest.mark.parametrize("task,config", [("pretrain", "configs/demo.py"),
                                         ("finetune", "configs/demo_finetune.py")])
def test_the_compiled_batch_is_the_pipelines(task, config, tmp_path, synthetic_data):
  """What the pod check compiles for is what the run's input pipeline gives: the same
  entries, shapes and dtypes."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.data.dir = synthetic_data[1]
  cfg.data.workers = 0
  cfg.batch_size = 8
  cfg.init.encoder = ""
  if task == "finetune":
    cfg.num_classes = 8
  make = pretrain.make_task if task == "pretrain" else finetune.make_task
  loop = trainer.build(cfg, str(tmp_path), make)
  try:
    host = loop.task.dataset[0]
    compiled_for = {k: (tuple(np.shape(host[k])[1:]), np.asarray(host[k]).dtype)
                    for k in loop.task.example}
    assert compiled_for == {k: (tuple(s), np.dtype(d)) for k, (s, d) in
                            loop.task.example.items()}
  finally:
    loop.close()


def test_search_batch_doubles_to_the_largest_that_fits(tmp_path):
  proc = _aot(*DEMO, "--topology", "v5e:2x2", "--search_batch", "--largest", "16",
              "--json", str(tmp_path / "search.json"))
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  found = json.loads((tmp_path / "search.json").read_text())
  assert sorted(int(k) for k in found["tried"]) == [8, 16]       # from the config's 8
  assert all("fits" in v and "not" not in v for v in found["tried"].values())
  assert found["best"]["per_chip_batch"] == 16 and found["best"]["fits"]
  assert "largest per-chip batch that fits: 16 (--largest 16)" in proc.stdout


def test_the_breakdown_counts_the_tpu_programs_matmuls_exactly():
  """benchmarks/mfu_breakdown.py reads the TPU compiler's program: its matmul FLOPs (dense
  and batched products, forward and their gradients, which libtpu writes as convolutions with
  batch dimensions folded into windows) equal the count by hand and the compiler's own."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from benchmarks import mfu_breakdown
  mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")[:1]), ("d",))
  spec = NamedSharding(mesh, PartitionSpec())

  def forward(x, w, q, k):
    return (jnp.einsum("btd,de->bte", x, w).sum()
            + jnp.einsum("bhtd,bhsd->bhts", q, k).sum())

  shapes = [(8, 50, 128, 256), (8, 4, 50, 32)]
  (b, t, d, e), (_, h, _, hd) = shapes
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=spec)
          for s in ((b, t, d), (d, e), (b, h, t, hd), (b, h, t, hd))]
  once = 2 * b * t * d * e + 2 * b * h * t * t * hd
  for fn, expected in ((forward, once), (jax.grad(forward, argnums=(0, 1, 2, 3)), 2 * once)):
    with executables.no_persistent_cache():
      compiled = jax.jit(fn).lower(*args).compile()
    parts = mfu_breakdown.analyse(compiled.as_text())
    counted = sum(row[2] for row in parts.values())
    assert counted == expected, parts
    assert counted == pytest.approx(aot._cost(compiled)["flops"], rel=0.01)
    assert sum(row[1] for row in parts.values()) > 0       # the compiler's cycle estimates

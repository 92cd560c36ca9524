r"""Compile time of the pretraining step, unrolled against scanned, cold and warm: lowering and
compilation on this host's XLA:CPU and by the TPU compiler for a named slice (libtpu), with the
program's memory beside each.

  python benchmarks/compile_time.py --vit L/16 --per_device 4 --topology v5e:2x2

Each row is a fresh process. "cold": an empty persistent compilation cache; "warm": a second
process on the cache the cold one filled (XLA:CPU only: a program compiled for a TPU that is
not here is never cached, `uniemox_jax.aot`). Memory: on the CPU the compiler's temporaries
(activations and scratch), on the TPU the per-chip peak against the chip's HBM. The scanned
rows use the recipe's defaults (configs/pretrain.py); the unrolled rows turn `model.scan` and
`teacher.scan` off and `model.remat` to "none".
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> dict:
  """One compile in this process: {"lower_s", "compile_s", "gib", ...}."""
  sys.path.insert(0, ROOT)
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config(f"vit={args.vit}")
  if args.layout == "unrolled":
    config.model.scan, config.teacher.scan, config.model.remat = False, False, "none"
  if args.backend != "cpu":
    from uniemox_jax import aot  # pylint: disable=g-import-not-at-top
    config.batch_size = args.per_device * len(aot.topology_devices(args.backend))
    report = aot.compile_step(config, args.backend)
    return dict(lower_s=report.lower_s, compile_s=report.compile_s,
                gib=report.peak_bytes / aot.GIB, loops=report.loops)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", args.cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()   # the imports above compiled small programs: decide again
  from uniemox_jax import aot, optim, sharding, trainer  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(-1, 1)
  config.batch_size = args.per_device * mesh.devices.size
  task = aot.step_task(config, mesh, tempfile.mkdtemp())
  program = trainer.StepProgram(config, mesh, task, optim.resolve_schedule(config, 10 ** 6))
  started = time.perf_counter()
  lowered = program.step.lower(*program.abstract_inputs())
  lower_s, started = time.perf_counter() - started, time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - started
  entries = len(os.listdir(args.cache))
  return dict(lower_s=lower_s, compile_s=compile_s, cache_entries=entries,
              gib=compiled.memory_analysis().temp_size_in_bytes / 2 ** 30,
              loops=aot.loops(compiled.as_text()))


def run(args, backend: str, layout: str, cache: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend,
         "--layout", layout, "--vit", args.vit, "--per_device", str(args.per_device),
         "--cache", cache]
  env = dict(os.environ, JAX_PLATFORMS="cpu" if backend == "cpu" else "",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.cpu_devices}")
  started = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else
            f"exit {proc.returncode}"}
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["process_s"] = time.perf_counter() - started
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vit", default="L/16")
  p.add_argument("--per_device", type=int, default=4, help="images per device or chip")
  p.add_argument("--topology", default="v5e:2x2", help="'' for XLA:CPU rows only")
  p.add_argument("--cpu_devices", type=int, default=2)
  p.add_argument("--layouts", default="unrolled,scanned")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--backend", default="cpu", help=argparse.SUPPRESS)
  p.add_argument("--layout", default="scanned", help=argparse.SUPPRESS)
  p.add_argument("--cache", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return
  print(f"pretraining {args.vit}, {args.per_device} images per device; every figure a wall "
        "time of this host\n")
  print("| compiler | layout | start | loops | lower s | compile s | process s | GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for layout in args.layouts.split(","):
    with tempfile.TemporaryDirectory() as cache:
      rows = [("XLA:CPU", "cpu", "cold"), ("XLA:CPU", "cpu", "warm")]
      if args.topology:
        rows.append((f"TPU {args.topology}", args.topology, "cold"))
      for name, backend, start in rows:
        r = run(args, backend, layout, cache)
        if "error" in r:
          print(f"| {name} | {layout} | {start} | - | - | - | - | {r['error']} |", flush=True)
          continue
        print(f"| {name} | {layout} | {start} | {r['loops']} | {r['lower_s']:.1f} | "
              f"{r['compile_s']:.1f} | {r['process_s']:.1f} | {r['gib']:.2f} |", flush=True)


if __name__ == "__main__":
  main()

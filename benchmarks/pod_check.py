r"""The pod check's table: the real pretraining and fine-tuning steps compiled by the TPU
compiler for named slices on this CPU host (`uniemox_jax.aot`), beside the naive MAE step of
`benchmarks/train_step.py` (data parallel, XLA attention, no teacher) compiled for the same
slice as the baseline of the ratio.

  python benchmarks/pod_check.py --topologies v5e:2x2,v4:2x2x1,v5p:2x2x1 --vit B/16,L/16 \
      --per_chip 32 --tasks mae,pretrain,finetune --json pod_check.json

Every figure is the compiler's estimate (its cost model, else the roofline of its FLOP and
byte counts, or its ops' cycles one after another: the table says which), not a measurement.
Rows print as they finish.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from benchmarks import train_step  # noqa: E402
from configs import finetune as finetune_config  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402
from uniemox_jax import aot  # noqa: E402
from uniemox_jax import executables  # noqa: E402
from uniemox_jax import flops  # noqa: E402
from uniemox_jax import sharding  # noqa: E402

HEADER = ("| slice | step | per-chip batch | mesh | GiB per chip (of HBM) | estimate | ms | "
          "img/s/chip | MFU | x MAE | ops' cycles ms | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def mae_report(variant: str, topology: str, per_chip: int) -> aot.Report:
  """The naive MAE step (benchmarks/train_step.py), data parallel over the slice."""
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh(-1, 1, devices=devices)
  init, step, _ = train_step.mae_fns(variant, jnp.bfloat16, "xla", "none")
  batch = {"scene": jax.ShapeDtypeStruct((per_chip * len(devices), 224, 224, 3), jnp.bfloat16)}
  state = jax.eval_shape(init, jax.random.key(0), batch)
  replicated, rows = NamedSharding(mesh, PartitionSpec()), sharding.batch_sharding(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       state)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in batch.items()}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  jitted = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=(0,))
  started = time.perf_counter()
  lowered = jitted.lower(state, {}, batch, key)
  lower_s, started = time.perf_counter() - started, time.perf_counter()
  with executables.no_persistent_cache():
    compiled = lowered.compile()
  return aot.report_of(compiled, topology=topology, chips=len(devices), task="mae-naive",
                       variant=variant, per_chip_batch=per_chip, mesh=dict(mesh.shape),
                       analytic_flops=flops.per_image("mae", variant) * per_chip,
                       lower_s=lower_s, compile_s=time.perf_counter() - started)


def task_report(task: str, variant: str, topology: str, per_chip: int, fsdp: int,
                twin: bool = True) -> aot.Report:
  if task == "pretrain":
    config = pretrain_config.get_config(f"vit={variant}")
  else:
    config = finetune_config.get_config(f"dataset=emoset,vit={variant}")
  config.batch_size = per_chip * len(aot.topology_devices(topology))
  config.mesh.fsdp = fsdp
  # The recipes scan: memory and compile time are the scanned step's, the time its unrolled
  # twin's (the compiler counts a loop's body once), or with twin=False the scanned step's own
  # ops' cycles, its loops at their trip counts.
  return aot.compile_step(config, topology, unrolled_twin=twin)


def estimate(r: aot.Report) -> str:
  return ("ops' cycles" if r.seconds == r.cycles_s else
          "cost model" if r.cost_model_s > 0 else "roofline")


def row(r: aot.Report, mae: "aot.Report | None" = None) -> str:
  """The table's row of `r`; "x MAE": its images/s over `mae`'s by the same instrument (a
  step timed by its ops' cycles against the MAE step's cycles, not its roofline)."""
  ratio = "-"
  if mae is not None:
    baseline = (mae.per_chip_batch / mae.cycles_s if estimate(r) == "ops' cycles"
                else mae.images_per_s)
    ratio = f"{r.images_per_s / baseline:.2f}" if baseline > 0 else "-"
  serial = f"{r.cycles_s * 1e3:.1f}" if r.cycles_s > 0 else "-"
  return (f"| {r.topology} | {r.task} {r.variant} | {r.per_chip_batch} | "
          f"{r.mesh['data']}x{r.mesh['fsdp']} | {r.peak_bytes / aot.GIB:.1f} "
          f"({r.hbm_bytes / aot.GIB:.0f}){'' if r.fits else ' over'} | {estimate(r)} | "
          f"{r.seconds * 1e3:.1f} | {r.images_per_s:.0f} | {100 * r.mfu:.1f}% | {ratio} | "
          f"{serial} | {r.compile_s:.0f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topologies", default="v5e:2x2")
  p.add_argument("--vit", default="B/16")
  p.add_argument("--per_chip", type=int, default=32)
  p.add_argument("--fsdp", type=int, default=1, help="the mesh's fsdp axis of our steps")
  p.add_argument("--tasks", default="mae,pretrain,finetune")
  p.add_argument("--json", default="")
  p.add_argument("--no_twin", action="store_true",
                 help="scanned steps take their own ops' cycles (loops at their trip counts) "
                      "as their time, instead of compiling their unrolled twin (minutes)")
  args = p.parse_args()
  print(f"jax {jax.__version__}; host: {os.cpu_count()} CPUs; libtpu compiles", flush=True)
  print(HEADER, flush=True)
  results = []
  for topology in args.topologies.split(","):
    for variant in args.vit.split(","):
      mae = None
      for task in args.tasks.split(","):
        try:
          if task == "mae":
            r = mae_report(variant, topology, args.per_chip)
            mae = r
          else:
            r = task_report(task, variant, topology, args.per_chip, args.fsdp,
                            twin=not args.no_twin)
        except aot.CompileRefused as e:
          print(f"| {topology} | {task} {variant} | {args.per_chip} | refused: {e} |",
                flush=True)
          continue
        print(row(r, mae if task == "pretrain" else None), flush=True)
        results.append(r.to_json())
        if args.json:
          with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

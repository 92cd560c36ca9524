r"""Fine-tunes one pretrained checkpoint on a list of benchmarks x seeds: the runs of the
paper's table (then `python -m uniemox_jax.results ROOT` writes it).

  python -m uniemox_jax.suite --pretrained /ckpt/uniemox-l16/checkpoints \
      --benchmarks emo8=/data/emo8,fi=/data/fi,emotion6=/data/emotion6 --seeds 0,1,2 \
      --root /ckpt/suite [--variant vit=L/16] [--config.total_epochs=50 ...]
  python -m uniemox_jax.suite ... --slurm      # a SLURM job array, one task per run

Each run is `python -m uniemox_jax.main --config CONFIG:dataset=B,data=DIR,init=PRETRAINED
--config.seed=S --workdir ROOT/B/seed_S` (any other --config.field=value is passed on to every
run). Locally the runs go one after another; a finished one (its test report written) is
skipped, an interrupted one resumes from its checkpoints, and a failed one is reported and
the rest still run. With --slurm, ROOT/suite.sbatch is written (an array of one task per
benchmark x seed; each task runs its run with --task, requeued when preempted) and submitted
with sbatch when it is on PATH.

Exit codes: 0 every run finished; 1 some run failed (each named); 2 a wrong flag; 75 a run was
preempted (rerun the same command to go on).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import List, Sequence, Tuple

from data_pipelines import storage
from uniemox_jax import errors
from uniemox_jax import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> Tuple[argparse.Namespace, List[str]]:
  p = argparse.ArgumentParser(description="Fine-tune one checkpoint on benchmarks x seeds.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--pretrained", required=True,
                 help="the pretrained encoder every run starts from (config.init.encoder)")
  p.add_argument("--benchmarks", required=True,
                 help="comma-separated NAME=DATA_DIR (NAME: a config dataset, e.g. emo8)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  p.add_argument("--root", required=True, help="workdirs go to ROOT/<benchmark>/seed_<seed>")
  p.add_argument("--config", default="configs/finetune.py",
                 help="the fine-tuning config file (its variant keys dataset, data and init "
                      "are set per run)")
  p.add_argument("--variant", default="", help="more variant keys, e.g. vit=B/16,epochs=50")
  p.add_argument("--slurm", action="store_true",
                 help="write ROOT/suite.sbatch, a job array of one task per run, and submit it")
  p.add_argument("--task", type=int, default=None,
                 help="run the task with this index only (what each array task runs)")
  p.add_argument("--dry_run", action="store_true", help="print the runs' commands only")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (only --config.field=value is passed "
            "on to the runs)")
  # Absolute paths: the runs and the array tasks start in other folders.
  config_file, sep, _ = args.config.partition(":")
  if not os.path.exists(config_file) and os.path.exists(os.path.join(ROOT, config_file)):
    config_file = os.path.join(ROOT, config_file)
  if not os.path.exists(config_file):
    p.error(f"--config {config_file} does not exist")
  if sep:
    p.error(f"--config {args.config}: give variant keys with --variant, not after ':'")
  args.config = os.path.abspath(config_file)
  args.root, args.pretrained = storage.absolute(args.root), storage.absolute(args.pretrained)
  args.benchmarks = ",".join(f"{n}={storage.absolute(d)}" for n, d in benchmarks(args.benchmarks))
  return args, rest


def benchmarks(spec: str) -> List[Tuple[str, str]]:
  out = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    name, sep, data = item.partition("=")
    if not sep or not name or not data:
      raise ValueError(f"--benchmarks: {item!r} should be NAME=DATA_DIR")
    out.append((name, data))
  if len({n for n, _ in out}) != len(out):
    raise ValueError(f"--benchmarks names a benchmark twice: {spec}")
  return out


def tasks(args) -> List[Tuple[str, str, int, str]]:
  """(benchmark, data dir, seed, workdir) of every run, benchmark-major."""
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds {args.seeds!r} should be comma-separated integers") from None
  if not seeds:
    raise ValueError("--seeds is empty")
  return [(name, data, seed, storage.join(args.root, name, f"seed_{seed}"))
          for name, data in benchmarks(args.benchmarks) for seed in seeds]


def run_command(args, overrides: Sequence[str], task) -> List[str]:
  name, data, seed, workdir = task
  variant = ",".join(filter(None, [f"dataset={name}", f"data={data}",
                                   f"init={args.pretrained}", args.variant]))
  return [sys.executable, "-m", "uniemox_jax.main", "--config", f"{args.config}:{variant}",
          f"--config.seed={seed}", f"--workdir={workdir}", *overrides]


def finished(workdir: str) -> bool:
  """The run's best state has its test report: what `uniemox_jax.results` averages."""
  best = finetune.read_best(workdir)
  if not best.get("step"):
    return False
  config_path = storage.join(workdir, "config.json")
  split = "test"
  if storage.exists(config_path):
    split = json.loads(storage.read_text(config_path)).get("test_split") or "test"
  return storage.exists(finetune.test_report_file(workdir, best["step"], split))


def sbatch_script(args, overrides: Sequence[str], count: int) -> str:
  """A SLURM array of `count` tasks, each running `--task $SLURM_ARRAY_TASK_ID`."""
  again = [sys.executable, "-m", "uniemox_jax.suite", "--pretrained", args.pretrained,
           "--benchmarks", args.benchmarks, "--seeds", args.seeds, "--root", args.root,
           "--config", args.config] + (["--variant", args.variant] if args.variant else []) + \
      list(overrides)
  logs = storage.join(args.root, "logs")
  return f"""#!/usr/bin/env bash
# Written by `python -m uniemox_jax.suite --slurm`: one array task per benchmark x seed.
# Submit again (`sbatch {storage.join(args.root, 'suite.sbatch')}`) to finish what is left:
# finished runs are skipped, interrupted ones resume. GPUs and nodes per task: pass sbatch's
# own flags (--gpus-per-node, --nodes), which override the lines below.
#SBATCH --job-name=uniemox-suite
#SBATCH --array=0-{count - 1}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={logs}/%x-%A_%a.out
set -euo pipefail
cd {shlex.quote(ROOT)}
[[ -f .venv/bin/activate ]] && source .venv/bin/activate
PREEMPTED={errors.EXIT_PREEMPTED}
set +e
srun --kill-on-bad-exit=1 {shlex.join(again)} --task "$SLURM_ARRAY_TASK_ID"
code=$?
set -e
if [[ $code -eq $PREEMPTED ]]; then
  echo "preempted: requeueing task ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $code
"""


def main(argv=None) -> int:
  args, overrides = parse_args(argv)
  todo = tasks(args)
  if args.task is not None:
    if not 0 <= args.task < len(todo):
      raise ValueError(f"--task {args.task} is not one of the {len(todo)} tasks (0.."
                       f"{len(todo) - 1})")
    command = run_command(args, overrides, todo[args.task])
    if args.dry_run:
      print(shlex.join(command))
      return 0
    os.execv(command[0], command)     # the array task is the run itself (its exit code)
  if args.slurm:
    storage.makedirs(storage.join(args.root, "logs"))
    path = storage.join(args.root, "suite.sbatch")
    storage.write_text(path, sbatch_script(args, overrides, len(todo)))
    if args.dry_run or shutil.which("sbatch") is None:
      print(f"wrote {path} ({len(todo)} array tasks); submit it with: sbatch {path}")
      return 0
    return subprocess.run(["sbatch", path], check=False).returncode
  failed = []
  for i, task in enumerate(todo):
    name, _, seed, workdir = task
    command = run_command(args, overrides, task)
    where = f"[{i + 1}/{len(todo)}] {name} seed {seed}"
    if args.dry_run:
      print(shlex.join(command))
      continue
    if finished(workdir):
      print(f"{where}: finished, skipped ({workdir})", flush=True)
      continue
    print(f"{where}: {shlex.join(command)}", flush=True)
    code = subprocess.run(command, check=False).returncode
    if code == errors.EXIT_PREEMPTED:
      print(f"{where}: preempted; rerun the same command to resume", file=sys.stderr)
      return errors.EXIT_PREEMPTED
    if code != 0:
      failed.append(f"{name} seed {seed} (exit {code}, {workdir})")
  if failed:
    print("failed: " + "; ".join(failed), file=sys.stderr)
    return 1
  if not args.dry_run:
    print(f"done: the table with  python -m uniemox_jax.results {args.root}")
  return 0


if __name__ == "__main__":
  errors.run_command(main)

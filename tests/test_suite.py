"""The paper's table in one command: the suite fine-tunes one pretrained checkpoint on two
synthetic benchmarks x two seeds (real processes, one after another), the results command
reads the finished workdirs, and the SLURM array script runs the same tasks."""
import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from uniemox_jax import finetune
from uniemox_jax import results
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny fine-tuning of the demo encoder: 4 steps, validation at 2 and 4, then the test split.
TINY = ["--variant", "vit=mu/8", "--config.model.image_size=32", "--config.model.dtype=float32",
        "--config.model.scan=False", "--config.model.remat=none", "--config.batch_size=16",
        "--config.total_steps=4", "--config.eval_every_steps=2", "--config.eval_batch_size=16",
        "--config.data.workers=0", "--config.augment.rand_augment=False",
        "--config.augment.mixup_alpha=0.0", "--config.augment.cutmix_alpha=0.0",
        "--config.log_every_steps=3"]


def _suite(*args, check=True):
  proc = subprocess.run([sys.executable, "-m", "uniemox_jax.suite", *args], cwd=ROOT,
                        env=environment.subprocess_env(1), capture_output=True, text=True,
                        timeout=1200)
  if check:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def suite(pretrained, synthetic_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("suite")
  args = ["--pretrained", os.path.join(pretrained, "checkpoints"), "--benchmarks",
          f"emo8={os.path.join(pretrained, 'synthetic')},emoset={synthetic_data[1]}",
          "--seeds", "0,1", "--root", str(root), *TINY]
  proc = _suite(*args)
  return root, args, proc


def _report(workdir):
  best = json.load(open(os.path.join(workdir, finetune.BEST_FILE)))
  report = json.load(open(finetune.test_report_file(workdir, best["step"], "test")))
  return best, report


def test_the_suite_runs_every_benchmark_and_seed_once(suite):
  root, args, proc = suite
  for name in ("emo8", "emoset"):
    for seed in (0, 1):
      workdir = root / name / f"seed_{seed}"
      config = json.load(open(workdir / "config.json"))
      assert (config["dataset"], config["seed"], config["total_steps"]) == (name, seed, 4)
      best, report = _report(str(workdir))
      assert best["epoch"] == pytest.approx(best["step"] / (128 if name == "emo8" else 48)
                                            * 16)
      assert report["num_examples"] == (32 if name == "emo8" else 16)
  assert proc.stdout.count(": finished, skipped") == 0
  assert "done: the table with  python -m uniemox_jax.results" in proc.stdout
  # Again: every run is finished, nothing runs.
  again = _suite(*args)
  assert again.stdout.count(": finished, skipped") == 4


def test_results_table_equals_the_runs_reports(suite, tmp_path, capsys):
  root, _, _ = suite
  out = tmp_path / "table"
  assert results.main([str(root), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  rows = {(r["benchmark"], r["metric"]): r for r in csv.DictReader(open(out / "results.csv"))}
  for name in ("emo8", "emoset"):
    reports = [_report(str(root / name / f"seed_{s}")) for s in (0, 1)]
    for key in ("top1", "top3", "macro_f1"):
      values = np.array([r[key] for _, r in reports])
      row = rows[(name, key)]
      assert row["n"] == "2" and row["seeds"] == "0 1"
      assert float(row["mean"]) == pytest.approx(values.mean(), abs=1e-12)
      assert float(row["std"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
      assert [float(v) for v in row["values"].split()] == list(values)
    epochs = np.array([b["epoch"] for b, _ in reports])
    assert float(rows[(name, "epoch")]["mean"]) == pytest.approx(epochs.mean())
    top1 = np.array([r["top1"] for _, r in reports]) * 100
    cell = f"{top1.mean():.2f} ± {top1.std(ddof=1):.2f}"
    assert f"| {name} | 2 | {cell} |" in printed
  assert (out / "results.md").read_text() in printed
  assert (out / "results.png").stat().st_size > 10_000
  assert "Not averaged" not in printed


def test_runs_that_cannot_be_averaged_are_listed(suite, tmp_path, capsys):
  root, _, _ = suite
  mine = tmp_path / "runs"
  shutil.copytree(root / "emo8", mine / "emo8")
  seed0 = mine / "emo8" / "seed_0"

  def variant(name, **changes):
    shutil.copytree(seed0, mine / "emo8" / name)
    path = mine / "emo8" / name / "config.json"
    config = json.load(open(path))
    for dotted, value in changes.items():
      node = config
      *parents, leaf = dotted.split("__")
      for p in parents:
        node = node[p]
      node[leaf] = value
    json.dump(config, open(path, "w"))
    return mine / "emo8" / name

  variant("seed_0_again")                                       # the same seed twice
  variant("seed_7_lr", seed=7, optim__base_lr=0.5)              # another recipe
  variant("seed_8_init", seed=8, init__encoder="/elsewhere")    # another encoder
  unfinished = variant("seed_9", seed=9)
  best = json.load(open(unfinished / finetune.BEST_FILE))
  os.remove(finetune.test_report_file(str(unfinished), best["step"], "test"))
  assert results.main([str(mine), "--out", str(tmp_path / "t")]) == 0
  text = capsys.readouterr().out
  assert "| emo8 | 2 |" in text
  assert "seed_0_again (emo8, seed 0): seed 0 is already counted" in text
  assert ("seed_7_lr (emo8, seed 7): its config differs from the other emo8 runs' apart from "
          "the seed: optim.base_lr=0.5 (others 0.001)") in text
  assert "seed_8_init (emo8, seed 8): another pretrained encoder: '/elsewhere'" in text
  assert "seed_9 (emo8, seed 9): unfinished: no test report of the best state" in text
  # Nothing finished at all: refused in one line.
  shutil.rmtree(mine / "emo8" / "seed_0")
  shutil.rmtree(mine / "emo8" / "seed_1")
  for d in ("seed_0_again", "seed_7_lr", "seed_8_init"):
    shutil.rmtree(mine / "emo8" / d)
  assert results.main([str(mine)]) == 2
  with pytest.raises(FileNotFoundError, match="holds no run"):
    results.main([str(tmp_path / "t")])


def test_slurm_array_runs_one_task_each_and_requeues_when_preempted(suite, tmp_path):
  root, args, _ = suite
  slurm_root = tmp_path / "slurm"
  args = [a if a != str(root) else str(slurm_root) for a in args]
  proc = _suite(*args, "--slurm")
  script = slurm_root / "suite.sbatch"
  assert f"wrote {script} (4 array tasks); submit it with: sbatch {script}" in proc.stdout
  text = script.read_text()
  assert "#SBATCH --array=0-3" in text
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  # SLURM's launcher and requeue, as this machine has no SLURM: srun records the command it
  # was given and ends as a preempted task (75); scontrol records the requeue.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in (("srun", 'shift; printf "%s\\n" "$@" > "$LOG/srun"; exit 75'),
                     ("scontrol", 'echo "$@" > "$LOG/scontrol"')):
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (bin_dir / name).chmod(stat.S_IRWXU)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(tmp_path),
             SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="2")
  run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
  assert run.returncode == 75, run.stderr
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "77_2"]
  task = (tmp_path / "srun").read_text().splitlines()
  assert task[:3] == [sys.executable, "-m", "uniemox_jax.suite"] and task[-2:] == ["--task", "2"]
  # The task's run: the third of benchmark-major order, emoset seed 0.
  shown = subprocess.run(task + ["--dry_run"], cwd=ROOT, capture_output=True, text=True,
                         env=environment.subprocess_env(1))
  assert shown.returncode == 0, shown.stderr
  assert ":dataset=emoset,data=" in shown.stdout and "--config.seed=0" in shown.stdout
  assert f"--workdir={slurm_root}/emoset/seed_0" in shown.stdout
  assert "--config.total_steps=4" in shown.stdout


def test_bad_suite_flags_are_named(tmp_path):
  base = ["--pretrained", str(tmp_path), "--root", str(tmp_path / "r")]
  for extra, message in (
      (["--benchmarks", "emo8"], "--benchmarks: 'emo8' should be NAME=DATA_DIR"),
      (["--benchmarks", "emo8=/d", "--task", "5"], "--task 5 is not one of the 3 tasks"),
      (["--benchmarks", "emo8=/d", "--epochs", "3"], "unrecognized arguments: --epochs 3")):
    proc = _suite(*base, *extra, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr

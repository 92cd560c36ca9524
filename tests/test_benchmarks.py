"""The benchmark scripts keep running (at their smallest sizes) on CPU."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_train_step_benchmark_tiny():
  out = _run("train_step.py", "--vit", "mu/16", "--batch", "2", "--steps", "1")
  rows = [line.split() for line in out.splitlines() if line.startswith(("mae", "uniemox"))]
  assert [r[0] for r in rows] == ["mae", "uniemox"]
  assert all(float(r[2]) > 0 for r in rows)       # images/s


def test_input_pipeline_benchmark_tiny():
  out = _run("input_pipeline.py", "--images_per_class", "6", "--size", "64",
             "--image_size", "32", "--batch", "8", "--workers", "1")
  assert "pretrain pipeline (1 core)" in out and "finetune pipeline (1 core)" in out


def test_finetune_step_benchmark_tiny():
  out = _run("finetune_step.py", "--vit", "mu/16", "--batch", "2", "--steps", "1")
  rows = [line.split() for line in out.splitlines() if line.startswith(("plain", "finetune"))]
  assert [r[0] for r in rows] == ["plain", "finetune"]
  assert all(float(r[2]) > 0 for r in rows)       # images/s

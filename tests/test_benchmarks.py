"""The benchmark scripts keep running (at their smallest sizes) on CPU, and the analytic FLOP
count that MFU divides by agrees with XLA's own count of the compiled step."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=environment.QUICK_COMPILE)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _rows(out, *prefixes):
  return [line.split() for line in out.splitlines() if line.startswith(prefixes)]


def test_train_step_benchmark_tiny():
  # float32 at 32 px: bfloat16 is emulated on a CPU (the FLOP checks below lower bf16 steps).
  out = _run("train_step.py", "--vit", "mu/16", "--batch", "2", "--steps", "1",
             "--windows", "2", "--attention", "xla", "--image_size", "32", "--scan",
             "--dtype", "float32", "--decoder_depth", "1")
  assert "decoder depth 1" in out
  rows = _rows(out, "mae", "uniemox")
  assert [r[0] for r in rows] == ["mae-naive", "uniemox"]
  for r in rows:
    # ... batch, images/s, min-max over the windows, model TF/s, XLA TF/s, MFU, compile, ratio
    rate, lo_hi = float(r[-7]), r[-6]
    lo, hi = map(float, lo_hi.split("-"))
    assert 0 < lo <= rate <= hi
    assert float(r[-2]) > 0                 # compile seconds


def test_finetune_step_benchmark_tiny():
  out = _run("finetune_step.py", "--vit", "mu/16", "--batch", "2", "--steps", "1",
             "--windows", "1", "--attention", "xla", "--image_size", "32", "--dtype", "float32")
  rows = _rows(out, "plain", "finetune")
  assert [r[0] for r in rows] == ["plain", "finetune"]
  assert all(float(r[-7]) > 0 for r in rows)


def test_input_pipeline_benchmark_tiny():
  out = _run("input_pipeline.py", "--images_per_class", "6", "--size", "64",
             "--image_size", "32", "--batch", "8", "--workers", "1")
  assert "pretrain pipeline (1 core)" in out and "finetune pipeline (1 core)" in out


@pytest.mark.parametrize("model,variant", [("mae", "B/16"), ("uniemox", "B/16")])
def test_analytic_flops_match_xla_cost_analysis(model, variant):
  """XLA counts every operation, the analytic count only matrix products: XLA's is a little
  larger, never smaller (measured 0.9-1.4% for these steps)."""
  sys.path.insert(0, ROOT)
  from uniemox_jax import flops
  from benchmarks import train_step
  batch = 8
  if model == "mae":
    init, step, teacher = train_step.mae_fns(variant, jnp.bfloat16, "xla", "none")
  else:
    init, step, teacher = train_step.uniemox_fns(variant, jnp.bfloat16, "xla", "none", False,
                                                 "fused", abstract_teacher=True)
  data = train_step.fake_batch(batch, jnp.bfloat16)
  state = jax.eval_shape(init, jax.random.key(0), data)
  teacher_params = teacher.params if teacher else {}      # shapes only
  cost = jax.jit(step).lower(state, teacher_params, data, jax.random.key(0)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops.per_image(model, variant, global_batch=batch)
  assert 1.0 <= cost["flops"] / batch / analytic <= 1.02


def test_analytic_flops_of_the_published_census():
  """The census in docs/benchmarks.md (GFLOP per image, batch 256)."""
  sys.path.insert(0, ROOT)
  from uniemox_jax import flops
  assert round(flops.per_image("uniemox", "L/16", teacher_cls_only=False) / 1e9, 1) == 251.5
  assert round(flops.per_image("uniemox", "B/16", teacher_cls_only=False) / 1e9, 1) == 119.9
  assert round(flops.per_image("uniemox", "L/16") / 1e9, 1) == 249.0
  assert round(flops.per_image("mae", "L/16") / 1e9, 1) == 124.2
  # --decoder_depth 1 removes 7 decoder blocks (width 512, MLP 2048, all 196 patches + CLS),
  # each counted three times (forward and both gradients).
  for model in ("mae", "uniemox"):
    removed = flops.per_image(model, "B/16") - flops.per_image(model, "B/16", decoder_depth=1)
    assert removed == pytest.approx(3 * 7 * flops.block(197, 512, 2048))


def test_code_lines_leave_out_blanks_comments_and_docstrings():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import code_lines
  finally:
    sys.path.pop(0)
  source = '''"""A module docstring
over two lines."""
import os  # a comment after code


def f(x):
  """A function's docstring."""
  # a comment line
  text = ("a string "
          "over two lines")
  return x + len(text)
'''
  assert code_lines.code_lines(source) == 5      # the import, def, two string lines, return
  out = _run("code_lines.py")
  assert out.strip().endswith("code lines in %d files (working tree)" % sum(
      1 for p in code_lines.PACKAGES for _, _, files in os.walk(os.path.join(ROOT, p))
      for f in files if f.endswith(".py")))


def test_pod_check_compares_a_scanned_step_with_the_mae_step_by_one_instrument():
  """A scanned step is timed by its ops' cycles; its ratio to the MAE step (unrolled, timed by
  its roofline) must use the MAE step's cycles too, not mix the two estimates."""
  from benchmarks import pod_check  # pylint: disable=g-import-not-at-top
  from uniemox_jax import aot  # pylint: disable=g-import-not-at-top

  def report(task, loops, cycles_ms):
    return aot.Report(
        topology="v5e:4x4", chips=16, task=task, variant="B/16", per_chip_batch=32,
        mesh={"data": 16, "fsdp": 1}, hbm_bytes=16 * aot.GIB, peak_bytes=aot.GIB, memory={},
        collectives={}, compiler_flops=1e12, bytes_accessed=4e10, cost_model_s=-1.0,
        analytic_flops=1e12, peak_tflops=197.0, hbm_gb_s=819.0, lower_s=1.0, compile_s=1.0,
        loops=loops, cycles=cycles_ms * 1e-3 * aot.CLOCK_GHZ["v5e"] * 1e9)
  mae, step = report("mae-naive", 0, 30.0), report("pretrain", 5, 90.0)
  assert pod_check.estimate(mae) == "roofline" and pod_check.estimate(step) == "ops' cycles"
  cells = [c.strip() for c in pod_check.row(step, mae).split("|")]
  assert cells[6] == "ops' cycles" and cells[10] == f"{30.0 / 90.0:.2f}"
  # By the roofline (48.8 ms) the MAE step would give 0.54: the mixed ratio this replaces.
  assert f"{mae.roofline_s / step.seconds:.2f}" != cells[10]
  assert [c.strip() for c in pod_check.row(step).split("|")][10] == "-"

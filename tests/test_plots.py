"""The curves command on a real run's metrics.jsonl, and what it does with a resumed or killed
run's file."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from uniemox_jax import errors
from uniemox_jax import curves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_curves_of_a_pretraining_run(pretrained, tmp_path):
  rows = curves.read_metrics(os.path.join(pretrained, "metrics.jsonl"))
  chosen = curves.panels(rows)
  logged = {k for values in rows.values() for k in values}
  # Every evaluator of the run gets a panel with all its scalars; the training panels hold
  # what the run logged.
  evaluators = {k.split("/")[0] for k in logged if "/" in k}
  assert evaluators and evaluators <= set(chosen)
  assert all(chosen[e] == sorted(k for k in logged if k.startswith(e + "/"))
             for e in evaluators)
  assert {"losses", "learning rate", "images/s"} <= set(chosen)
  assert set(chosen["losses"]) == {"total", "l1", "l2", "l3"} & logged

  out = tmp_path / "curves.png"
  proc = subprocess.run([sys.executable, "-m", "uniemox_jax.plots", pretrained,
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"wrote: {out}" in proc.stdout
  png = np.asarray(Image.open(out))
  assert png.shape[1] == 1200 and png.shape[0] >= 320 * ((len(chosen) + 1) // 2)
  assert (png[..., :3] < 250).any(axis=-1).mean() > 0.02      # something is drawn


def test_resumed_and_killed_runs(pretrained, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  lines = open(os.path.join(pretrained, "metrics.jsonl")).read().splitlines()
  first = json.loads(lines[0])
  again = dict(first, total=123.0)               # a resumed run logs the step again
  (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(again)]) + "\n{\"step\": 9")
  rows = curves.read_metrics(str(run / "metrics.jsonl"))     # the cut-off last line skipped
  assert rows[first["step"]]["total"] == 123.0 and len(rows) == len(lines)
  (run / "metrics.jsonl").write_text("\n".join([lines[0], "not json", lines[1]]))
  with pytest.raises(errors.UserError, match="line 2: not a JSON object"):
    curves.read_metrics(str(run / "metrics.jsonl"))
  shutil.rmtree(run)
  with pytest.raises(errors.UserError, match="run's folder"):
    curves.read_metrics(str(run / "metrics.jsonl"))

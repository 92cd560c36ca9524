"""The README's main-job command, end to end on the demo config."""
import json
import os
import subprocess
import sys

import pytest

from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, python_flags=()):
  # The tests' compilation cache, not the demo config's workdirs/jax_cache in the checkout.
  env = environment.subprocess_env(8)
  return subprocess.run([sys.executable, *python_flags, "-m", "uniemox_jax.main", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_demo_command_trains_and_writes_its_workdir(tmp_path):
  """The README's main job (shortened: the loss curve is checked on test_finetune's
  pretraining fixture)."""
  proc = _run("--config", "configs/demo.py:evals=False", f"--workdir={tmp_path}",
              "--config.total_steps=10", "--config.data.synthetic_per_class=6,2,2",
              "--config.log_every_steps=5", python_flags=("-X", "importtime"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Training imports no TensorFlow (TensorBoard events are ours, summaries.py): of clu, the
  # parameter overview only, never its TensorFlow-backed metric writers.
  imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  assert {"jax", "uniemox_jax.summaries", "clu.parameter_overview"} <= imported
  assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras")}
  assert not {m for m in imported if m.startswith("clu.metric_writers")}
  # The parameter overview, logged once at the start: a row per array, then the total.
  assert "Parameters at step 0:" in proc.stderr
  assert "| encoder/cls_token" in proc.stderr and "Total: " in proc.stderr
  proc.stderr = "\n".join(line for line in proc.stderr.splitlines()
                          if not line.startswith("import time:"))
  # Quiet: the config's path, not its contents; no library chatter; a progress line per log.
  assert f"config: {tmp_path}/config.json" in proc.stdout
  for noise in ("oneDNN", "TensorFlow binary", "FutureWarning", "could not be restored",
                "cpu_feature_guard", "Setting work unit notes", "mask_ratio: 0.75"):
    assert noise not in proc.stderr, noise
  # The peak learning rate is printed when training starts (demo: 4e-3 x 32 / 256).
  assert "peak lr 0.0005 (base_lr 0.004 x 32 / 256)" in proc.stderr, proc.stderr[-2000:]
  progress = [line for line in proc.stderr.splitlines() if "step 5/10 (50%)" in line]
  assert progress and "img/s" in progress[0] and "left" in progress[0], proc.stderr[-2000:]
  result, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
  assert {"l1", "l2", "l3", "total", "grad_norm", "learning_rate"} <= set(result)
  assert result["grad_norm"] > 0
  assert abs(result["total"] - (result["l1"] + result["l2"] + result["l3"])) < 1e-5
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["variant"] == "mu/8" and saved["total_steps"] == 10
  assert (tmp_path / "tiny_clip" / "flax_model.msgpack").exists()
  assert (tmp_path / "checkpoints" / "10").is_dir()
  assert list(tmp_path.glob("events.out.tfevents.*"))        # TensorBoard
  assert (tmp_path / "synthetic" / "uniemox_info.json").exists()

  # The demo's second command: fine-tune that encoder, then the test table is printed.
  proc = _run("--config", f"configs/demo_finetune.py:pretrained={tmp_path}",
              f"--workdir={tmp_path / 'finetune'}", "--config.total_epochs=2",
              "--config.eval_every_epochs=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout[proc.stdout.index("test split:"):proc.stdout.index("wrote:")].splitlines()
  assert table[1].startswith("num_examples=16  top1=")
  assert [line.split()[0] for line in table[3:]] == json.loads(
      (tmp_path / "synthetic" / "uniemox_info.json").read_text())["class_names"]
  assert (tmp_path / "finetune" / "best.json").exists()


def test_default_pretraining_peak_lr_is_within_maes_rule():
  from configs import pretrain
  from uniemox_jax import optim
  config = pretrain.get_config()
  assert config.batch_size == 4096
  assert optim.peak_lr(config) <= 1.5e-4 * config.batch_size / 256 + 1e-12
  reference = pretrain.get_config("lr=reference")
  assert reference.optim.base_lr == 1e-3 and optim.peak_lr(reference) == 1e-3 * 4096 / 256
  with pytest.raises(ValueError, match="lr='fast': choose one of"):
    pretrain.get_config("lr=fast")


@pytest.mark.parametrize("arg,message", [
    ("configs/pretrain.py:vit=Z/16", "Unknown ViT variant 'Z/16'"),
    ("configs/pretrain.py:losses=l1+l9", "unknown terms ['l9']"),
    ("configs/pretrain.py:maks=0.9", "unknown config variant key 'maks'"),
])
def test_bad_config_is_named(tmp_path, arg, message):
  proc = _run("--config", arg, f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert message in proc.stderr


def test_every_benchmark_gets_twenty_steps_per_epoch():
  from configs import finetune
  from uniemox_jax import optim
  for name, spec in finetune.DATASETS.items():
    config = finetune.get_config(f"dataset={name}")
    steps = spec["train_images"] // config.batch_size
    assert steps >= finetune.MIN_STEPS_PER_EPOCH, (name, steps)
    assert optim.peak_lr(config) == 1e-3 * config.batch_size / 256


def test_evaluation_imports_nothing_of_the_training_loop():
  """The evaluation command, every evaluator, the linear-probe task and prediction read
  encoders, teachers and data through modules of their own (importers, teacher/loading,
  datasets), not the trainer."""
  # One command a process: each defines its flags at import.
  for modules in ("uniemox_jax.evaluate, uniemox_jax.evaluators, uniemox_jax.linear_probe",
                  "uniemox_jax.predict, uniemox_jax.prediction"):
    code = ("import sys\n"
            f"import {modules}\n"
            "print(sorted(m for m in sys.modules if m in ('uniemox_jax.trainer', "
            "'uniemox_jax.finetune', 'uniemox_jax.pretrain', 'uniemox_jax.optim', "
            "'uniemox_jax.objective')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", modules

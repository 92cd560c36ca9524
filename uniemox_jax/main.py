r"""Entry point: `python -m uniemox_jax.main --config configs/demo.py --workdir DIR`.

Runs the config's task - UniEmoX pretraining (`uniemox_jax.pretrain`), fine-tuning
(`uniemox_jax.finetune`) or a linear probe (`uniemox_jax.linear_probe`) - and prints the
final metrics as JSON (fine-tuning: with the test table). The resolved config is logged and written to WORKDIR/config.json. Any
config field can be overridden: `--config.batch_size=512`.

Several processes (TPU pod slices, SLURM GPU jobs) are detected and joined automatically; a
hand-started multi-process run passes --coordinator_address, --num_processes, --process_id.
"""
from __future__ import annotations

import json
import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from uniemox_jax import distributed
from uniemox_jax import finetune
from uniemox_jax import linear_probe
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax import pretrain

TASKS = {"pretrain": pretrain.pretrain, "finetune": finetune.finetune,
         "linear_probe": linear_probe.linear_probe}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's and grain's per-operation INFO lines out of the training log."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))
    return record.levelno >= pylogging.WARNING or not noisy


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required")
  # Before anything touches a JAX backend.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  task = config.get("task", "pretrain")
  if task not in TASKS:
    raise app.UsageError(f"config.task={task!r}: choose one of {sorted(TASKS)}")
  # A config error fails here, before anything loads.
  if task == "pretrain":
    models.pretrain_model(config.model)
  else:
    models.classification_model(config.model, config.num_classes)
  os.makedirs(workdir, exist_ok=True)
  logging.info("Config:\n%s", config)
  logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  result = TASKS[task](config, workdir)
  if jax.process_index() == 0:
    test = result.pop("test", None) if isinstance(result, dict) else None
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    if test is not None:
      print(metrics.format_table(test, f"{config.test_split} split: {test['checkpoint']}"))


if __name__ == "__main__":
  app.run(main)

"""One run of a config's task, as the commands start it: the task checked, the workdir locked,
the resolved config written, the task run, and what it wrote reported.

  result = runs.run_task(config, workdir)     # python -m uniemox_jax.main (and the demo)
  runs.report(config, workdir, result)

Tasks (config.task): pretrain (`uniemox_jax.pretrain`), finetune (`uniemox_jax.finetune`),
linear_probe (`uniemox_jax.linear_probe`).
"""
from __future__ import annotations

import json
import os

from absl import logging
import jax

from data_pipelines import storage
from uniemox_jax import distributed
from uniemox_jax import errors
from uniemox_jax import finetune
from uniemox_jax import linear_probe
from uniemox_jax import metrics
from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax import pretrain
from uniemox_jax import workdir_lock

TASKS = {"pretrain": pretrain.pretrain, "finetune": finetune.finetune,
         "linear_probe": linear_probe.linear_probe}

def check_config(config) -> str:
  """The task, after every model field is checked (before anything loads)."""
  task = config.task
  if task not in TASKS:
    raise errors.UserError(f"config.task={task!r}: choose one of {sorted(TASKS)}")
  with errors.as_user_errors():
    if task == "pretrain":
      models.pretrain_model(config.model)
      objective.from_config(config.model)
    else:
      models.classification_model(config.model, config.num_classes)
  return task


def compilation_cache_dir(value: str) -> str:
  """config.compilation_cache_dir as a path: "auto" is jax_cache/ in the user's cache
  ($UNIEMOX_CACHE_DIR, else ~/.cache/uniemox_jax), "" none; a relative path is taken from the
  current directory, like --workdir; gs:// works too."""
  if value == "auto":
    return os.path.join(storage.cache_dir(), "jax_cache")
  return storage.absolute(value) if value else ""


def use_compilation_cache(config) -> None:
  """config.compilation_cache_dir: JAX's persistent cache of compiled programs (a rerun, or
  a resumed run, then skips most compilation)."""
  path = compilation_cache_dir(config.compilation_cache_dir)
  if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):    # the environment wins
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, the small ones too: the first checkpoint save compiles one slice per
    # array shape (~150 for the demo, 7 s on a CPU), which a threshold would never keep.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # XLA's own caches beside it (GPU autotuning results and kernels).
    jax.config.update("jax_persistent_cache_enable_xla_caches", "all")


def run_task(config, workdir: str, force_unlock: bool = False):
  """Checks the config, takes the workdir's lock (`uniemox_jax.workdir_lock`), writes
  WORKDIR/config.json, runs the task; returns its result."""
  task = check_config(config)
  use_compilation_cache(config)
  with errors.as_user_errors():
    storage.makedirs(workdir)
  with workdir_lock.held(workdir, force_unlock, holder=jax.process_index() == 0):
    distributed.barrier("workdir locked")
    logging.info("Process %d of %d; %d devices (%s)", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
    if jax.process_index() == 0:
      path = storage.join(workdir, "config.json")
      storage.write_text(path, config.to_json_best_effort(indent=2))
      print(f"config: {path}", flush=True)
    return TASKS[task](config, workdir)


def report(config, workdir: str, result) -> None:
  """Prints the final metrics (and a fine-tuning's test table) and what the run wrote."""
  if jax.process_index() == 0:
    test = result.pop("test", None) if isinstance(result, dict) else None
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    if test is not None:
      print(metrics.format_table(test, f"{config.test_split} split: {test['checkpoint']}"))
    print(f"wrote: {workdir} ({', '.join(written(workdir))})", flush=True)


# What a run may leave in its workdir, in the order the "wrote:" line lists it.
_OUTPUTS = ("config.json", "checkpoints/", "best/", "best.json", "metrics.jsonl",
            "evaluations/", "linear_probe/")


def written(workdir: str):
  """The run outputs that exist in `workdir` (TensorBoard's events files counted as one)."""
  names = set(storage.listdir(workdir)) if storage.isdir(workdir) else set()
  found = [name for name in _OUTPUTS if name.rstrip("/") in names]
  found += sorted(name for name in names if name.endswith("_results.json"))
  if any(name.startswith("events.out.tfevents.") for name in names):
    found.append("TensorBoard events")
  return found

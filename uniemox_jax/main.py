r"""Entry point: `python -m uniemox_jax.main --config configs/demo.py --workdir DIR`.

Runs the config's task - UniEmoX pretraining (`uniemox_jax.pretrain`), fine-tuning
(`uniemox_jax.finetune`) or a linear probe (`uniemox_jax.linear_probe`) - and prints the
final metrics as JSON (fine-tuning: with the test table). The resolved config is written to
WORKDIR/config.json (its path is printed). Any config field can be overridden:
`--config.batch_size=512`.

Exit codes: 0 done; 2 a user's mistake or the environment's refusal (one line names the file,
field or flag); 75 preempted and 130 Ctrl-C (state saved: rerun the same command to resume);
1 anything else. The library: `uniemox_jax.runs`.

Several processes (TPU pod slices, SLURM GPU jobs) are detected and joined automatically; a
hand-started multi-process run passes --coordinator_address, --num_processes, --process_id.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from uniemox_jax import distributed  # noqa: E402
from uniemox_jax import runs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_FORCE_UNLOCK = flags.DEFINE_bool(
    "force_unlock", False, "take over WORKDIR's lock although it names a process on another "
    "host (only once that run has ended)")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required")
  # Before anything touches a JAX backend.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  runs.report(config, workdir, runs.run_task(config, workdir, _FORCE_UNLOCK.value))


if __name__ == "__main__":
  cli.run(main)

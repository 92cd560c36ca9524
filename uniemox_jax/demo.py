r"""The embedded default in one process: pretrain the tiny UniEmoX on the synthetic set
(configs/demo.py), then fine-tune its encoder and print the test table
(configs/demo_finetune.py). This is what `make demo` runs:

  python -m uniemox_jax.demo --workdir workdirs/demo

It is the same as running `uniemox_jax.main` with the two configs one after the other
(README), in one process, so imports are paid once; compiled programs are kept in the user's
cache (config.compilation_cache_dir "auto": ~/.cache/uniemox_jax/jax_cache), so a rerun skips
most compilation.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

import os  # noqa: E402

from absl import flags  # noqa: E402

from uniemox_jax import config_utils  # noqa: E402
from uniemox_jax import runs  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The pretraining workdir; "
                               "fine-tuning goes to its finetune/.")
_FORCE_UNLOCK = flags.DEFINE_bool("force_unlock", False, "as for uniemox_jax.main")


def main(argv):
  del argv
  demo_config = config_utils.repository_config("demo")
  demo_finetune = config_utils.repository_config("demo_finetune")
  workdir, force = _WORKDIR.value, _FORCE_UNLOCK.value
  pretrain_config = demo_config.get_config()
  runs.report(pretrain_config, workdir, runs.run_task(pretrain_config, workdir, force))
  finetune_config = demo_finetune.get_config(f"pretrained={workdir}")
  finetune_dir = os.path.join(workdir, "finetune")
  runs.report(finetune_config, finetune_dir, runs.run_task(finetune_config, finetune_dir, force))


if __name__ == "__main__":
  cli.run(main)

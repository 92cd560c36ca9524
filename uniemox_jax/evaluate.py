r"""The evaluation command: any evaluator of `config.evals` on any checkpoint.

  python -m uniemox_jax.evaluate --config configs/finetune.py:dataset=emo8,data=/data/emo8 \
      --checkpoint WORKDIR/best [--evals classification] [--split test] [--out_dir OUT]
  python -m uniemox_jax.evaluate --config configs/demo.py --checkpoint workdirs/demo/checkpoints \
      [--evals zero_shot,linear_probe,reconstruction] [--data DIR]

Every example of the split counts exactly once on any number of devices and processes. Each
evaluator's report (top-1 / top-3 accuracy, per-class accuracy, macro F1 and the confusion
matrix as JSON and PNG, or mAP and per-class AP for multi-label data; the reconstruction
grid) goes to OUT/<evaluator>-<dataset>-<split>-<fingerprint>/ with the settings.json the
fingerprint stands for, and is printed as a table. OUT defaults to
WORKDIR/evaluations/<checkpoint dir>-<step>/ beside the checkpoint, where a training run's own
reports are OUT/<evaluator>/, which this command never writes. The library:
`uniemox_jax.evaluators.evaluate_checkpoint`.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from uniemox_jax import distributed  # noqa: E402
from uniemox_jax import evaluators  # noqa: E402
from uniemox_jax import metrics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config the checkpoint was trained with (model, data, teacher, evals).",
    lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A checkpoint directory (<dir> or <dir>/<step>).")
_EVALS = flags.DEFINE_string("evals", None, "Comma-separated names of config.evals to run "
                             "(default: all of them).")
_SPLIT = flags.DEFINE_string("split", None, "The split every chosen evaluator reports on "
                             "(default: each one's config.evals.<name>.split).")
_DATA = flags.DEFINE_string("data", None, "A converted dataset directory for every chosen "
                            "evaluator (default: each one's data, else the config's).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the reports go, one folder per "
                               "evaluation (default: WORKDIR/evaluations/<checkpoint "
                               "dir>-<step>, beside the checkpoint).")


def main(argv):
  del argv
  distributed.initialize(None, None, None)
  names = [n for n in (_EVALS.value or "").split(",") if n]
  results = evaluators.evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, names,
                                           _SPLIT.value or "", _DATA.value or "",
                                           _OUT_DIR.value)
  if jax.process_index() == 0:
    for name, result in results.items():
      title = f"{name}, {result['split']}: {result['checkpoint']}"
      if "num_examples" in result:
        print(metrics.format_table(result, title))
      else:
        scalars = ", ".join(f"{k} {v:.4g}" for k, v in result["scalars"].items())
        print(title + (": " + scalars if scalars else ""))
      print("wrote: " + ", ".join(result["files"]), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint"])
  cli.run(main)

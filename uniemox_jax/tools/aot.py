r"""Compiles a config's train step for a TPU slice on this (CPU) host, before paying for the pod:
per-chip memory against HBM, the collectives, the TPU cost model's step time, images/s per
chip and MFU (the library: `uniemox_jax.aot`).

  python -m uniemox_jax.tools.aot --config configs/pretrain.py:vit=L/16 --topology v5e:2x2 \
      --config.batch_size=128 --unrolled_twin
  python -m uniemox_jax.tools.aot --config configs/finetune.py:dataset=emoset --topology v4:2x2x1
  python -m uniemox_jax.tools.aot --config configs/pretrain.py --topology v5e:4x4 \
      --config.mesh.fsdp=16 --search_batch
  python -m uniemox_jax.tools.aot --config configs/pretrain.py:vit=L/16 --topology v5e:4x4 \
      --write_step gs://bucket/steps/l16-v5e16.bin    # then, on the pod: train with
      # --config.compiled_step=gs://bucket/steps/l16-v5e16.bin (no compile before step 1)

Needs libtpu: pip install -e '.[tpu]'. No data and no weights are read. --json writes the
numbers (one object, or a list with --search_batch). Exit codes: 0 compiled and fits; 1
compiled but over the chip's HBM (or --search_batch found no batch that fits); 2 a refused
flag or config, or a step the TPU compiler refuses (one line with its reason).
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

import json  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines import storage  # noqa: E402
from uniemox_jax import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (with :variant).",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice: v5e:2x2, v5e:4x4, v4:2x2x1, "
                                "v5p:2x2x1, ...")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center "
                                   "network (the mesh's data axis spans them).")
_SEARCH = flags.DEFINE_bool("search_batch", False, "Double the per-chip batch from the "
                            "config's until the step no longer compiles or fits (or passes "
                            "--largest); report the largest that fits.")
_LARGEST = flags.DEFINE_integer("largest", 1024, "--search_batch: the largest per-chip batch "
                                "to try.")
_TWIN = flags.DEFINE_bool("unrolled_twin", False, "A step with scanned stacks (loops, whose "
                          "bodies the compiler counts once) takes its time estimate from the "
                          "same step unrolled, compiled too.")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
_WRITE_STEP = flags.DEFINE_string("write_step", None, "Also write the compiled step to this "
                                  "file (local or gs://): a run on this slice with the same "
                                  "config loads it with --config.compiled_step=FILE instead "
                                  "of compiling.")


def main(argv):
  del argv
  config = _CONFIG.value
  if _SEARCH.value:
    best, tried = aot.search_batch(config, _TOPOLOGY.value, _NUM_SLICES.value, _LARGEST.value)
    if best is None:
      print(f"no per-chip batch tried fits {_TOPOLOGY.value}: {tried}")
    else:
      print(f"largest per-chip batch that fits: {best.per_chip_batch}"
            + (f" (--largest {_LARGEST.value})" if 2 * best.per_chip_batch > _LARGEST.value
               else ""))
      print(best.summary())
    if _JSON.value:
      storage.write_text(_JSON.value, json.dumps(
          {"best": best.to_json() if best else None, "tried": tried}, indent=2))
    return 0 if best is not None else 1
  report = aot.compile_step(config, _TOPOLOGY.value, _NUM_SLICES.value,
                            unrolled_twin=_TWIN.value, write_step=_WRITE_STEP.value)
  print(report.summary())
  if _WRITE_STEP.value:
    print(f"wrote the compiled step to {_WRITE_STEP.value} "
          f"({storage.getsize(_WRITE_STEP.value) / 2 ** 20:.1f} MiB): run with "
          f"--config.compiled_step={_WRITE_STEP.value}")
  if _JSON.value:
    storage.write_text(_JSON.value, json.dumps(report.to_json(), indent=2))
  return 0 if report.fits else 1


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(main)

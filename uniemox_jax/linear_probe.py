"""The linear-probe task (configs/linear_probe.py): the linear-probe evaluator
(`uniemox_jax.evaluators.linear_probe`) on an imported encoder (config.init.encoder), trained
on config.data.split, its weight decay chosen on config.data.eval_split, reported on
config.test_split. Reports go to WORKDIR/linear_probe/.
"""
from __future__ import annotations

from typing import Any, Dict

from data_pipelines import dataset_info
from uniemox_jax import datasets
from uniemox_jax import errors
from uniemox_jax import importers
from uniemox_jax import models
from uniemox_jax import sharding
from uniemox_jax.evaluators import linear_probe as probe_lib
from uniemox_jax.models import hf_backbone

NAME = "linear_probe"


def linear_probe(config, workdir: str) -> Dict[str, Any]:
  """Features once, a classifier per weight decay, the best on validation reported on test."""
  with errors.as_user_errors():     # the config, the data, the encoder: one line each
    data_dir = datasets.resolve_data_dir(config, workdir)
    datasets.check_dataset(config, dataset_info.DatasetInfo.load(data_dir, "config.data.dir"))
    backbone = config.model.get("backbone", "")
    if backbone and config.init.encoder:
      raise ValueError(f"config.model.backbone={backbone!r} is the encoder probed; "
                       f"config.init.encoder ({config.init.encoder!r}) must be empty")
    if not config.init.encoder and not backbone:
      raise ValueError("config.init.encoder is empty: a linear probe needs a pretrained encoder "
                       "(or config.model.backbone, a transformers vision backbone)")
    spec = dict(config.probe, type=NAME, data=data_dir, train_split=config.data.split,
                val_split=config.data.eval_split,
                split=config.test_split or config.data.eval_split,
                train_fraction=config.data.train_fraction)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    evaluator = probe_lib.LinearProbe(NAME, spec, config, workdir, mesh, progress=True)
    # The importers read the encoder into the layout of config.model's encoder (its position
    # table, a final norm), of which the probe uses all but the norm; a transformers backbone
    # is read as it is.
    if backbone:
      encoder = hf_backbone.load_variables(backbone)
    else:
      encoder = importers.import_encoder(config, models.encoder_template(config.model))
  result = evaluator.run({"encoder": encoder})
  report = dict(result.report, checkpoint=config.init.encoder or backbone,
                files=evaluator.write(result, workdir, at=config.init.encoder or backbone))
  return {"best_weight_decay": report["weight_decay"], "val": report.get("val"),
          "test": report}

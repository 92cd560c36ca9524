"""The linear probe: the task end to end, and features pooled as the fine-tuning head pools."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linear_probe as linear_probe_config
from data_pipelines import input_pipeline as ip
from uniemox_jax import errors
from uniemox_jax import linear_probe
from uniemox_jax import models
from uniemox_jax import runs
from uniemox_jax import sharding
from uniemox_jax.evaluators import linear_probe as probe_lib


def test_linear_probe_end_to_end(pretrained, tmp_path):
  config = linear_probe_config.get_config(f"demo=True,pretrained={pretrained}")
  config.probe.steps = 200
  config.data.train_fraction = 0.5       # the classifier sees 8 of each class's 16
  result = linear_probe.linear_probe(config, str(tmp_path))
  assert result["test"]["num_examples"] == 32
  assert result["test"]["train_subset"]["records"] == 64
  assert result["best_weight_decay"] in config.probe.weight_decays
  assert result["test"]["top1"] > 1 / 8
  assert os.path.exists(tmp_path / "linear_probe" / "test_results.json")
  # The command's closing "wrote:" line lists what the task wrote, nothing it did not.
  assert runs.written(str(tmp_path)) == ["linear_probe/"]


def test_linear_probe_input_errors_are_user_errors(pretrained, tmp_path):
  """The task's config and data problems are one-line user errors, not tracebacks."""
  config = linear_probe_config.get_config(f"demo=True,pretrained={pretrained}")
  config.init.encoder = ""
  with pytest.raises(errors.UserError, match="config.init.encoder is empty"):
    linear_probe.linear_probe(config, str(tmp_path))
  config.data.dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"config.data.dir .*nowhere does not exist"):
    linear_probe.linear_probe(config, str(tmp_path))


def test_linear_probe_pools_as_the_fine_tuning_head(odd_data):
  """The probe's features are the classifier's fc_norm output at initialization: a head of
  width D set to the identity makes the classifier's logits those features."""
  import flax.linen as nn
  config = linear_probe_config.get_config("demo=True")
  config.model.image_size = 32
  width = 64
  model = models.Classifier(num_classes=width, variant=config.model.variant, image_size=32,
                            pos_embed="sincos")
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  assert params["head"]["kernel"].shape == (width, width), "the variant's width changed"
  params["head"] = {"kernel": jnp.eye(width), "bias": jnp.zeros(width)}
  encoder = dict(params["encoder"], norm={"scale": jnp.full(width, 3.0),    # a final norm the
                                          "bias": jnp.ones(width)})         # probe must drop
  mesh = sharding.make_mesh(-1, 1)
  config.eval_batch_size = 8
  out = probe_lib.encoder_features(config, encoder, ["test"], mesh, odd_data,
                                   progress=False)["test"]
  images = np.stack([ip.EvalTransform(32).map(ip.ShardSource(odd_data, "test")[i])["image"]
                     for i in range(13)])
  from uniemox_jax import augment
  logits, _ = model.apply({"params": params}, augment.normalize(jnp.asarray(images)))
  np.testing.assert_allclose(out["features"], logits, rtol=1e-4, atol=1e-4)

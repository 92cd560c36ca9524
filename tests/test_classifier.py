"""Downstream classifier and loading a pretrained UniEmoX encoder into it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from uniemox_jax import models
from uniemox_jax.models import classifier as classifier_lib
from uniemox_jax.models import vit


def _pretrained_encoder(seed=0):
  enc = vit.Encoder("mu/8", image_size=32)
  images = jnp.zeros((1, 32, 32, 3))
  return enc, nn.unbox(enc.init(jax.random.key(seed), images)["params"])


def _model_config():
  """The demo's model fields, with a classifier's: the pretraining encoder's fixed positions,
  average pooling."""
  cfg = demo.get_config().model
  cfg.update(pos_embed="sincos", pool="avg")
  return cfg


def _classifier(num_classes=6):
  model = models.classification_model(_model_config(), num_classes)
  params = nn.unbox(model.init(jax.random.key(9), jnp.zeros((1, 32, 32, 3)))["params"])
  return model, params


def test_head_shapes_and_init():
  model = models.classification_model(_model_config(), 26)
  # A head of 64,000 weights, so that its init statistics are measurable: std 2e-5, truncated
  # at 2 std (a B/16 encoder under it would spend seconds drawing 86M weights on the CPU).
  params = nn.unbox(
      classifier_lib.Classifier(1000, "mu/8", image_size=32).init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
  kernel = np.asarray(params["head"]["kernel"])
  assert kernel.shape == (64, 1000)
  assert 1.9e-5 < kernel.std() < 2.1e-5
  assert np.abs(kernel).max() <= 2 * 2e-5 / classifier_lib._TRUNCATED_STD
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  assert "norm" not in params["encoder"]       # replaced by fc_norm after the pool
  logits, aux = model.apply(
      {"params": nn.unbox(model.init(jax.random.key(1), jnp.zeros((2, 32, 32, 3))))["params"]},
      jnp.ones((2, 32, 32, 3)))
  assert logits.shape == (2, 26) and logits.dtype == jnp.float32
  assert aux["features"].shape == (2, 64)


def test_loads_pretrained_encoder_and_matches_its_tokens():
  enc, pretrained = _pretrained_encoder()
  model, params = _classifier()
  loaded, report = classifier_lib.load_encoder_params(params, pretrained)
  assert sorted(report.dropped) == ["encoder/norm/bias", "encoder/norm/scale"]
  assert report.kept == ["fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  _, enc_aux = enc.apply({"params": pretrained}, images)
  pooled = np.asarray(enc_aux["pre_norm"][:, 1:].mean(axis=1))
  expect = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(
      pooled.var(-1, keepdims=True) + 1e-6)
  _, aux = model.apply({"params": loaded}, images)
  np.testing.assert_allclose(aux["features"], expect, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(loaded["head"]["kernel"], params["head"]["kernel"])


def test_mismatched_or_missing_arrays_are_named():
  _, pretrained = _pretrained_encoder()
  _, params = _classifier()
  bad = jax.tree.map(lambda x: x, pretrained)
  bad["cls_token"] = jnp.zeros((1, 1, 32))
  del bad["transformer"]["block_1"]
  bad["extra"] = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError) as err:
    classifier_lib.load_encoder_params(params, bad)
  msg = str(err.value)
  assert "encoder/cls_token: pretrained shape (1, 1, 32) != model shape (1, 1, 64)" in msg
  assert "missing encoder/transformer/block_1/attn/qkv/kernel" in msg
  assert "unexpected encoder/extra/w" in msg

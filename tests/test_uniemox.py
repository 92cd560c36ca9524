"""The UniEmoX pretraining model with its CLIP teacher: outputs, gradients, sharding."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import demo
from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax import sharding


def _model(**overrides):
  return dataclasses.replace(models.pretrain_model(demo.get_config().model), **overrides)


FULL = objective.Objective()


def _batch(teacher, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  texts = [f"The overall emotion conveyed is {e}." for e in
           ("awe", "fear", "anger", "sadness", "amusement", "disgust", "excitement",
            "contentment")[:batch]]
  return {"scene": rng.standard_normal((batch, 32, 32, 3)).astype(np.float32),
          "person": rng.standard_normal((batch, 32, 32, 3)).astype(np.float32),
          "text_emb": teacher.embed_texts(texts)}


def _init(model, batch, decode=True):
  variables = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                         batch["scene"], batch["person"], decode=decode)
  return nn.unbox(variables["params"])


@pytest.mark.parametrize("mask_ratio,kept", [(0.75, 4), (0.90, 1)])
def test_losses_and_aux(tiny_teacher, mask_ratio, kept):
  model = _model(mask_ratio=mask_ratio)
  batch = _batch(tiny_teacher)
  params = _init(model, batch)
  terms, aux = jax.jit(lambda p, k: FULL(
      model, p, tiny_teacher, tiny_teacher.params, batch, k))(params, jax.random.key(3))
  assert set(terms) == {"l1", "l2", "l3", "total"}
  np.testing.assert_allclose(terms["total"], terms["l1"] + terms["l2"] + terms["l3"], rtol=1e-6)
  assert all(np.isfinite(float(v)) for v in terms.values())
  for name in ("alpha", "beta", "gamma"):
    assert aux[name].shape == (8, 64)
  assert aux["prediction"].shape == aux["target"].shape == (8, 16, 8 * 8 * 3)
  # Independent masks for the two views, each hiding the same static number of patches.
  np.testing.assert_array_equal(aux["mask"].sum(1), 16 - kept)
  np.testing.assert_array_equal(aux["person_mask"].sum(1), 16 - kept)
  assert not np.array_equal(aux["mask"], aux["person_mask"])


def test_gradients_reach_every_trainable_param_and_no_teacher_param(tiny_teacher):
  model = _model()
  model = dataclasses.replace(model, student=dataclasses.replace(model.student, drop_path=0.1))
  batch = _batch(tiny_teacher)
  params = _init(model, batch)
  assert {"encoder", "decoder", "fuse"} <= set(params)

  def loss(p, teacher_params):
    terms, _ = FULL(model, p, tiny_teacher, teacher_params, batch, jax.random.key(4))
    return terms["total"]
  g_student, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, tiny_teacher.params)
  for path, g in traverse_util.flatten_dict(g_student, sep="/").items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), f"no gradient reaches {path}"
  assert all(np.all(g == 0) for g in jax.tree.leaves(g_teacher))


def test_loss_switches(tiny_teacher):
  batch = _batch(tiny_teacher)
  model = _model(fusion="none")
  only_l1 = objective.Objective(weights=(("l1", 1.0), ("l2", 0.0), ("l3", 0.0)))
  assert not only_l1.reconstructs
  params = _init(model, batch, decode=only_l1.reconstructs)
  # Without L3 the decoder's blocks and pixel head never run, so they have no parameters.
  assert not {"transformer", "pred", "norm"} & set(params["decoder"])
  terms, aux = only_l1(model, params, tiny_teacher, tiny_teacher.params, batch,
                       jax.random.key(0))
  assert "l3" not in terms and "prediction" not in aux
  np.testing.assert_allclose(terms["total"], terms["l1"], rtol=1e-6)
  np.testing.assert_array_equal(aux["gamma"], aux["alpha"])   # fusion off
  with pytest.raises(ValueError, match=r"loss_weights has unknown terms \['l4'\]"):
    objective.Objective(weights=(("l4", 1.0),))


def test_terms_are_the_losses_of_the_model_outputs(tiny_teacher):
  """The objective composes the loss functions over what the model returns: nothing else
  enters the terms."""
  from uniemox_jax import losses
  model, batch = _model(), _batch(tiny_teacher)
  params = _init(model, batch)
  terms, out = FULL(model, params, tiny_teacher, tiny_teacher.params, batch, jax.random.key(2))
  t = objective.teacher_outputs(tiny_teacher, tiny_teacher.params, batch)
  np.testing.assert_allclose(terms["l1"], losses.similarity_distillation_loss(
      out["gamma"], t["image_emb"], t["text_emb"], t["logit_scale"]), rtol=1e-6)
  np.testing.assert_allclose(terms["l2"], losses.embedding_cosine_loss(out["gamma"],
                                                                       t["image_emb"]), rtol=1e-6)
  np.testing.assert_allclose(terms["l3"], losses.masked_reconstruction_loss(
      out["prediction"], out["target"], out["mask"]), rtol=1e-6)
  weighted = objective.Objective(weights=(("l1", 2.0), ("l2", 0.0), ("l3", 0.5)))
  np.testing.assert_allclose(weighted.terms(out, t)["total"],
                             2.0 * terms["l1"] + 0.5 * terms["l3"], rtol=1e-6)


def test_text_tower_path_equals_precomputed_embeddings(tiny_teacher):
  batch = _batch(tiny_teacher, batch=2)
  texts = ["The overall emotion conveyed is awe.", "The overall emotion conveyed is fear."]
  with_tokens = dict(batch, **tiny_teacher.tokenize(texts))
  del with_tokens["text_emb"]
  a = objective.teacher_outputs(tiny_teacher, tiny_teacher.params, batch)
  b = objective.teacher_outputs(tiny_teacher, tiny_teacher.params, with_tokens)
  np.testing.assert_allclose(a["text_emb"], b["text_emb"], rtol=1e-5, atol=1e-6)
  with pytest.raises(KeyError, match="'text_emb' or 'input_ids'"):
    objective.teacher_outputs(tiny_teacher, tiny_teacher.params, {"scene": batch["scene"]})


def test_width_mismatch_names_the_config_fields(tiny_teacher):
  with pytest.raises(ValueError, match=r"config.model.decoder.width=512 must equal"):
    objective.check_compatible(_model(decoder_width=512), tiny_teacher)


def test_sharded_step_equals_single_device(tiny_teacher):
  """Under jit over 8 devices, L1 still spans the global batch: same losses as 1 device."""
  model = _model()
  batch = _batch(tiny_teacher)
  params = _init(model, batch)

  def run(p, b):
    return FULL(model, p, tiny_teacher, tiny_teacher.params, b, jax.random.key(5))[0]
  ref = jax.jit(run)(params, batch)
  mesh = sharding.make_mesh()
  sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
  assert len(sharded["scene"].sharding.device_set) == 8
  out = jax.jit(run)(params, sharded)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)

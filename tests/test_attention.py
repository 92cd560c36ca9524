"""Attention kernels: padding and masking leave the result unchanged, the choice of kernel is
validated, remat policies keep values and gradients, and activation sharding constraints
reach the lowered train step.

The cuDNN kernel itself only exists on NVIDIA GPUs; benchmarks/attention_check.py compares it
with XLA there (docs/benchmarks.md has the numbers). Here the padding it needs is checked on
the XLA kernel, which honours the same key-length mask.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax import sharding
from uniemox_jax.models import attention
from uniemox_jax.models import vit


def _qkv(batch, t, s, heads=2, dim=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (batch, t, heads, dim)),
          jax.random.normal(k2, (batch, s, heads, dim)),
          jax.random.normal(k3, (batch, s, heads, dim)))


@pytest.mark.parametrize("t,s,pad", [(50, 50, 64), (197, 197, 64), (20, 20, 8), (1, 197, 64),
                                     (197, 197, 128)])
def test_padding_and_key_mask_equal_unpadded_attention(t, s, pad):
  q, k, v = _qkv(2, t, s)
  ct = jax.random.normal(jax.random.key(9), q.shape)

  def run(pad_to):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, implementation="xla", pad_to=pad_to)
      return jnp.sum(out * ct), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, out_pad), grads_pad = run(pad)
  (_, out), grads = run(1)
  assert out_pad.shape == out.shape == q.shape
  np.testing.assert_allclose(out_pad, out, rtol=1e-5, atol=1e-6)
  for a, b in zip(grads_pad, grads):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # And both equal the textbook formula.
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  expect = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)
  np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_padding_changes_the_kernel_input_length():
  q, k, v = _qkv(1, 50, 50)
  text = jax.jit(lambda q, k, v: attention.dot_product_attention(
      q, k, v, implementation="xla", pad_to=64)).lower(q, k, v).as_text()
  assert "64x2x8" in text and "50x2x8" in text


def test_default_padding_follows_what_cudnn_accepts_and_runs_fastest():
  # Odd training lengths are refused by cuDNN: padded to a multiple of 64; even ones are not
  # padded (fastest on the H200); XLA never; an explicit multiple always applies.
  assert attention.padded_lengths("cudnn", 197, 197) == (256, 256)
  assert attention.padded_lengths("cudnn", 1, 197) == (64, 256)
  assert attention.padded_lengths("cudnn", 50, 50) == (50, 50)
  assert attention.padded_lengths("xla", 197, 197) == (197, 197)
  assert attention.padded_lengths("cudnn", 50, 50, 8) == (56, 56)
  assert attention.padded_lengths("xla", 50, 50, 64) == (64, 64)


def test_kernel_choice_is_validated():
  assert attention.resolve("auto", jnp.bfloat16, 64) == "xla"      # no GPU in the tests
  assert attention.resolve("xla", jnp.float32, 64) == "xla"
  with pytest.raises(ValueError, match="config.model.attention='cudnn' needs bfloat16"):
    attention.resolve("cudnn", jnp.float32, 64)
  with pytest.raises(ValueError, match="multiple of 8"):
    attention.resolve("cudnn", jnp.bfloat16, 12)
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    attention.resolve("flash", jnp.bfloat16, 64)
  cfg = pretrain_config.get_config("vit=mu/8").model
  cfg.attention = "flash"
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    models.pretrain_model(cfg)


def test_encoder_output_is_the_same_with_padded_attention():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  plain = vit.Encoder("mu/8", image_size=32, student=vit.StudentConfig(attention="xla"))
  padded = vit.Encoder("mu/8", image_size=32,
                       student=vit.StudentConfig(attention="xla", attention_pad=64))
  params = plain.init(jax.random.key(1), images)
  np.testing.assert_allclose(padded.apply(params, images)[0], plain.apply(params, images)[0],
                             rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(remat):
  cfg = pretrain_config.get_config("vit=mu/8").model
  cfg.update(image_size=32, dtype="float32", remat=remat)
  cfg.decoder.update(width=64, depth=2, heads=2)
  model = models.pretrain_model(cfg)
  img = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  emb = jax.random.normal(jax.random.key(1), (4, 64))
  teacher = {"image_emb": emb, "text_emb": emb, "logit_scale": 1.0}
  rngs = {"params": jax.random.key(2), "mask": jax.random.key(3)}
  params = nn.unbox(model.init(rngs, img, img))["params"]

  def loss(p):
    out = model.apply({"params": p}, img, img, rngs={"mask": jax.random.key(4)})
    return objective.Objective().terms(out, teacher)["total"]
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  return (jax.jit(jax.value_and_grad(loss))(params),
          jaxpr.count("remat") + jaxpr.count("checkpoint"))


@pytest.mark.parametrize("policy", ["full", "dots_no_batch", "decoder"])
def test_remat_policies_keep_values_and_gradients(policy):
  (loss, grads), _ = _loss_and_grads("none")
  (loss_r, grads_r), remat_ops = _loss_and_grads(policy)
  assert remat_ops > 0
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  # Rematerialized blocks sum in another order: float32 rounding at the scale of each
  # gradient (an element near zero beside values of 2 differs in its relative error).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b)))), grads_r, grads)


def test_remat_encoder_or_decoder_only_wraps_that_part():
  _, none_ops = _loss_and_grads("none")
  _, enc_ops = _loss_and_grads("encoder")
  _, dec_ops = _loss_and_grads("decoder")
  _, all_ops = _loss_and_grads("full")
  assert none_ops == 0
  # mu/8 has 2 encoder blocks, the test decoder 2 blocks: each part holds half of them.
  assert enc_ops == dec_ops and enc_ops + dec_ops == all_ops


def test_remat_booleans_of_older_configs_still_mean_full_and_none():
  assert vit.block_remat(True) == "full" and vit.block_remat(False) == "none"


def test_unknown_remat_policy_is_named():
  cfg = pretrain_config.get_config("vit=mu/8").model
  cfg.remat = "sometimes"
  with pytest.raises(ValueError, match="config.model.remat='sometimes'"):
    models.pretrain_model(cfg)


def test_activation_constraints_reach_the_lowered_step():
  """With the rules in scope (sharding.with_rules), the encoder's activation annotations
  become sharding constraints over an fsdp > 1 mesh; without them Flax drops them."""
  mesh = sharding.make_mesh(data=2, fsdp=4)
  model = vit.Encoder("mu/8", image_size=32)
  images = jnp.zeros((8, 32, 32, 3))
  params = nn.unbox(model.init(jax.random.key(0), images))

  def loss(p, x):
    return jnp.sum(model.apply(p, x)[0])
  grad = jax.grad(loss)
  plain = jax.jit(grad).lower(params, images).as_text()
  ruled = jax.jit(sharding.with_rules(grad, mesh)).lower(params, images).as_text()
  assert plain.count("sharding_constraint") == 0
  # One batch constraint per block input and one on each MLP hidden activation, forward
  # and backward.
  assert ruled.count("sharding_constraint") >= 2 * vit.decode_variant("mu/8").depth
  assert '"fsdp"' in ruled or "fsdp" in ruled

"""The CLIP teacher through transformers' Flax CLIP (pinned 4.x line), and the prompts."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax.teacher import clip
from uniemox_jax.teacher import prompts


def test_loads_from_saved_directory_and_embeds_under_jit(tiny_teacher):
  teacher = tiny_teacher
  assert teacher.embed_dim == 64 and teacher.image_size == 32
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  omega = jax.jit(teacher.image_embed)(teacher.params, images)
  tokens = teacher.tokenize(["The overall emotion conveyed is awe.", "a", ""])
  lam = jax.jit(teacher.text_embed)(teacher.params, tokens["input_ids"],
                                    tokens["attention_mask"])
  assert omega.shape == (3, 64) and lam.shape == (3, 64)
  np.testing.assert_allclose(np.linalg.norm(omega, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(lam, axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(lam[0], lam[1])
  # The student's image size need not be CLIP's: crops are resized on device.
  assert jax.jit(teacher.image_embed)(teacher.params, images[:, :16, :16]).shape == (3, 64)
  np.testing.assert_allclose(teacher.logit_scale(teacher.params),
                             np.exp(np.asarray(teacher.params["logit_scale"])), rtol=1e-6)


def test_embeddings_match_transformers_own_forward(tiny_teacher):
  """Our wrapper feeds CLIP the same pixels and tokens as a direct FlaxCLIPModel call."""
  teacher = tiny_teacher
  rng = np.random.default_rng(0)
  raw = rng.random((2, 32, 32, 3)).astype(np.float32)
  student = (raw - np.asarray(clip.IMAGENET_MEAN)) / np.asarray(clip.IMAGENET_STD)
  pixels = ((raw - np.asarray(clip.CLIP_MEAN)) / np.asarray(clip.CLIP_STD)).transpose(0, 3, 1, 2)
  tokens = teacher.tokenize(["The scene type of this photo is beach.", "awe"])
  out = teacher.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                      pixel_values=pixels.astype(np.float32), params=teacher.params)
  np.testing.assert_allclose(teacher.image_embed(teacher.params, student), out.image_embeds,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      teacher.text_embed(teacher.params, tokens["input_ids"], tokens["attention_mask"]),
      out.text_embeds, rtol=1e-4, atol=1e-5)


def test_teacher_params_get_no_gradient(tiny_teacher):
  teacher = tiny_teacher
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  grads = jax.grad(lambda p: jnp.sum(teacher.image_embed(p, images)))(teacher.params)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads))


def test_tokenize_truncates_to_77_and_keeps_eos(tiny_teacher):
  tok = tiny_teacher.tokenizer
  long = " ".join(["excitement"] * 200)
  ids = tiny_teacher.tokenize([long, "awe"])["input_ids"]
  assert ids.shape == (2, 77)
  assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
  assert list(ids[1]).index(tok.eos_token_id) < 10


def test_embed_texts_batches(tiny_teacher):
  texts = [prompts.build_prompt(e) for e in ("awe", "fear", "anger")]
  emb = tiny_teacher.embed_texts(texts, batch_size=2)
  assert emb.shape == (3, 64)
  one = tiny_teacher.embed_texts(texts[2:], batch_size=2)
  np.testing.assert_allclose(emb[2], one[0], rtol=1e-5, atol=1e-6)


def test_missing_or_incomplete_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip.ClipTeacher.load(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="lacks config.json or a weight file"):
    clip.ClipTeacher.load(str(tmp_path))


def test_unknown_normalization_is_named(tiny_teacher):
  with pytest.raises(ValueError, match="config.teacher.normalization"):
    clip.ClipTeacher(tiny_teacher.model, tiny_teacher.params, normalization="bogus")


def test_renormalize_roundtrip():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  im, cl = clip.NORMALIZATIONS["imagenet"], clip.NORMALIZATIONS["clip"]
  np.testing.assert_allclose(clip.renormalize(clip.renormalize(x, im, cl), cl, im), x,
                             atol=1e-5)


def test_prompt_with_all_attributes():
  text = prompts.build_prompt("awe", {
      "scene": "mountain", "objects": ["sky", "rock", "person"], "brightness": 0.6,
      "colorfulness": 0.3, "facial_expression": "surprise", "human_action": "hiking"})
  assert text == (
      "The scene type of this photo is mountain. The main subjects are sky, rock and person. "
      "The image has a brightness of 0.6 and color saturation of 0.3. Human facial expression "
      "is surprise. The action being performed is hiking. The overall emotion conveyed is awe.")


def test_prompt_skips_missing_attributes():
  assert prompts.build_prompt("fear") == "The overall emotion conveyed is fear."
  assert prompts.build_prompt("fear", {"scene": "", "objects": ["cat", "dog"],
                                       "brightness": 0.0, "human_action": None}) == (
      "The main subjects are cat and dog. The image has a brightness of 0. "
      "The overall emotion conveyed is fear.")
  assert prompts.build_prompt("joy", {"colorfulness": 0.5}) == (
      "The image has color saturation of 0.5. The overall emotion conveyed is joy.")
  with pytest.raises(ValueError, match="unknown prompt attributes"):
    prompts.build_prompt("fear", {"weather": "rain"})


def test_default_is_the_paper_teacher():
  assert clip.DEFAULT_CLIP == "openai/clip-vit-base-patch16"
  assert os.environ.get("HF_HUB_OFFLINE") == "1"   # tests never reach the hub

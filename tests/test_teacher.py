"""The CLIP teacher through transformers' Flax CLIP (pinned 4.x line), and the prompts."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax.teacher import clip
from uniemox_jax.teacher import clip_vision
from data_pipelines import prompts


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
      "The main subjects are cat and dog. The image has a brightness of 0.0. "
      "The overall emotion conveyed is fear.")
  # Values as the dataset labels them (the reference passes str(value)): "1.0", not "1".
  assert prompts.build_prompt("awe", {"brightness": 1.0, "colorfulness": 0.4}) == (
      "The image has a brightness of 1.0 and color saturation of 0.4. "
      "The overall emotion conveyed is awe.")
  assert prompts.build_prompt("joy", {"colorfulness": 0.5}) == (
      "The image has color saturation of 0.5. The overall emotion conveyed is joy.")
  with pytest.raises(ValueError, match="unknown prompt attributes"):
    prompts.build_prompt("fear", {"weather": "rain"})


def test_default_is_the_paper_teacher():
  assert clip.DEFAULT_CLIP == "openai/clip-vit-base-patch16"
  assert os.environ.get("HF_HUB_OFFLINE") == "1"   # tests never reach the hub


# --- the fused image tower (config.teacher.impl = "fused") ---------------------------------

def _random_images(n=3, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_fused_tower_equals_transformers_in_float32(tiny_clip_dir):
  ref = clip.ClipTeacher.load(tiny_clip_dir)
  fused = clip.ClipTeacher.load(tiny_clip_dir, impl="fused")
  assert fused.impl == "fused" and "vision_model" not in fused.params
  images = _random_images()
  np.testing.assert_allclose(jax.jit(fused.image_embed)(fused.params, images),
                             ref.image_embed(ref.params, images), atol=1e-5, rtol=0)
  tokens = ref.tokenize(["The overall emotion conveyed is awe.", "fear"])
  np.testing.assert_allclose(
      fused.text_embed(fused.params, tokens["input_ids"], tokens["attention_mask"]),
      ref.text_embed(ref.params, tokens["input_ids"], tokens["attention_mask"]), atol=1e-6)
  np.testing.assert_allclose(fused.logit_scale(fused.params), ref.logit_scale(ref.params))


@pytest.mark.parametrize("scan", [False, True])
def test_fused_tower_equals_transformers_with_exact_gelu_and_more_layers(scan):
  """Unrolled or scanned (blocks 0-1 stacked into one nn.scan, the CLS-only block 2 after)."""
  from transformers import CLIPConfig, FlaxCLIPModel
  config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2),
                      vision_config=dict(hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=3, num_attention_heads=3,
                                         image_size=48, patch_size=16, hidden_act="gelu",
                                         layer_norm_eps=1e-6),
                      projection_dim=24)
  model = FlaxCLIPModel(config, seed=3)
  ref = clip.ClipTeacher(model, model.params)
  vision = clip_vision.VisionConfig.from_clip_config(model.config)
  assert (vision.depth, vision.act, vision.eps, vision.embed_dim) == (3, "gelu", 1e-6, 24)
  fused = clip.ClipTeacher.from_vision_tower(
      vision, clip_vision.from_transformers(model.params, vision),
      float(model.params["logit_scale"]), scan=scan)
  if scan:
    assert fused.params["vision"]["blocks"]["fc1"]["kernel"].shape == (2, 48, 96)
    assert "block_0" not in fused.params["vision"] and "block_2" in fused.params["vision"]
  images = _random_images(2, 48)
  np.testing.assert_allclose(fused.image_embed(fused.params, images),
                             ref.image_embed(ref.params, images), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="no text tower"):
    fused.text_embed(fused.params, np.zeros((1, 77), np.int32))


def test_fused_tower_runs_its_last_block_on_the_cls_token_only():
  config = clip_vision.VisionConfig(width=32, depth=2, heads=2, mlp_dim=64, patch=8,
                                    image_size=32, embed_dim=16)
  tower = clip_vision.ClipVisionTower(config)
  images = _random_images(2)
  params = tower.init(jax.random.key(0), images)
  text = jax.jit(tower.apply).lower(params, images).as_text()
  # The last block's MLP sees [2, 1, 32] (CLS), the first block's [2, 17, 32] (all tokens).
  assert "2x1x64" in text and "2x17x64" in text


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_pytorch_only_folders_load_with_both_implementations(tiny_clip_dir, tmp_path,
                                                            serialization):
  """A folder written by transformers' PyTorch CLIPModel (model.safetensors or
  pytorch_model.bin, no Flax weights) loads and embeds exactly like the Flax one."""
  import shutil
  from transformers import CLIPConfig, CLIPModel, FlaxCLIPModel
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
  out = tmp_path / "pt"
  flax_model = FlaxCLIPModel.from_pretrained(tiny_clip_dir)
  torch_model = load_flax_weights_in_pytorch_model(
      CLIPModel(CLIPConfig.from_pretrained(tiny_clip_dir)), flax_model.params)
  torch_model.save_pretrained(out, safe_serialization=serialization == "safetensors")
  for name in os.listdir(tiny_clip_dir):       # the tokenizer files
    if name.endswith((".json", ".txt")) and name != "config.json":
      shutil.copy(os.path.join(tiny_clip_dir, name), out / name)
  weights = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}[serialization]
  assert weights in os.listdir(out) and "flax_model.msgpack" not in os.listdir(out)
  ref = clip.ClipTeacher.load(tiny_clip_dir)
  images = _random_images()
  for impl in clip.IMPLEMENTATIONS:
    teacher = clip.ClipTeacher.load(str(out), impl=impl)
    np.testing.assert_allclose(teacher.image_embed(teacher.params, images),
                               ref.image_embed(ref.params, images), atol=1e-5)


def test_unknown_teacher_implementation_is_named(tiny_clip_dir):
  with pytest.raises(ValueError, match="config.teacher.impl='torch'"):
    clip.ClipTeacher.load(tiny_clip_dir, impl="torch")

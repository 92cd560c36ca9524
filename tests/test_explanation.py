"""Heatmaps: rollout against one computed by hand from timm's own attention probabilities, and
every method on a model trained here on images whose class only an object at a known place
carries."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
from PIL import Image

from uniemox_jax import augment
from uniemox_jax import errors
from uniemox_jax import explanation
from uniemox_jax import prediction
from uniemox_jax import torch_import
from uniemox_jax import torch_export
from uniemox_jax.models import classifier
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZE, PATCH, GRID = 32, 8, 4


def _model(pool="avg", classes=2):
  return classifier.Classifier(classes, "mu/8", SIZE, pos_embed="learned", pool=pool)


def _params(model, seed=0):
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))["params"])
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.randn(*x.shape).astype(np.float32),
                      params)


def _hand_rollout(probs, pool, fusion, discard):
  """Abnar and Zuidema's rollout, in NumPy, from [B, H, T, T] attention per block."""
  batch, _, t, _ = probs[0].shape
  result = np.broadcast_to(np.eye(t), (batch, t, t))
  for a in probs:
    fused = {"mean": a.mean(1), "max": a.max(1), "min": a.min(1)}[fusion].copy()
    drop = int(t * t * discard)
    for b in range(batch):
      flat = fused[b].reshape(-1)
      flat[np.argsort(flat, kind="stable")[:drop]] = 0.0
    a = 0.5 * fused + 0.5 * np.eye(t)
    a = a / a.sum(-1, keepdims=True)
    result = a @ result
  rows = result[:, 0, 1:] if pool == "token" else result[:, 1:, 1:].mean(1)
  return rows.reshape(batch, GRID, GRID)


@pytest.mark.parametrize("pool,fusion,discard", [("avg", "mean", 0.0), ("token", "max", 0.5),
                                                 ("avg", "min", 0.9)])
def test_rollout_equals_one_by_hand_from_timms_attention(pool, fusion, discard):
  model = _model(pool)
  params = _params(model)
  images = np.random.RandomState(1).randint(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
  ours = explanation.explainer(model, pool, ["rollout", "grad_x_input"], fusion, discard)(
      params, images, -np.ones(3, np.int32))

  # The same weights in timm; its attention probabilities as its blocks compute them.
  vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=SIZE,
                          patch_size=PATCH, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                          global_pool=pool, fc_norm=pool == "avg", num_classes=2).eval()
  sd = torch_export.classifier_state_dict(params, SIZE)
  vit.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
  probs = []
  for block in vit.blocks:
    block.attn.fused_attn = False
    block.attn.attn_drop.register_forward_hook(
        lambda _, args, out: probs.append(args[0].detach().numpy()))
  x = torch.from_numpy(np.asarray(augment.normalize(images)).transpose(0, 3, 1, 2).copy())
  x.requires_grad_(True)
  logits = vit(x)
  np.testing.assert_allclose(ours["probabilities"], torch.softmax(logits, -1).detach(),
                             atol=1e-5)
  np.testing.assert_allclose(ours["rollout"], _hand_rollout(probs, pool, fusion, discard),
                             atol=1e-5)
  # Gradient x input by torch's autograd through timm: each patch's sum, its positive part.
  logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
  pixels = (x.grad * x).detach().numpy().reshape(3, 3, GRID, PATCH, GRID, PATCH)
  np.testing.assert_allclose(ours["grad_x_input"], np.maximum(pixels.sum((1, 3, 5)), 0),
                             rtol=1e-4, atol=1e-6)


def _object_images(n, seed):
  """Grey noise with one 8x8 square on a random patch: red is class 0, blue class 1."""
  rng = np.random.RandomState(seed)
  images = rng.randint(80, 176, (n, SIZE, SIZE, 3)).astype(np.uint8)
  labels = rng.randint(0, 2, n).astype(np.int32)
  boxes = []
  for i in range(n):
    y, x = PATCH * rng.randint(0, GRID, 2)
    images[i, y:y + PATCH, x:x + PATCH] = (220, 40, 40) if labels[i] == 0 else (40, 40, 220)
    boxes.append((y, x, y + PATCH, x + PATCH))
  return images, labels, boxes


@pytest.fixture(scope="module")
def trained():
  return _train("avg", weight_decay=1e-3)


@pytest.fixture(scope="module")
def trained_cls():
  return _train("token", weight_decay=1e-2)


def _train(pool, weight_decay, steps=200):
  """SGD with momentum, label smoothing and weight decay: the smoothing keeps a gradient after
  the task is solved and the decay spends it on weights the task does not need. Trained with
  Adam to zero loss instead, the same model's Grad-CAM put 0.14 of its mass in the box."""
  model = _model(pool)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"])
  opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(0.05, momentum=0.9))
  state = opt.init(params)

  @jax.jit
  def step(params, state, images, labels):
    def loss(p):
      logits, _ = model.apply({"params": p}, augment.normalize(images), train=False)
      targets = optax.smooth_labels(jax.nn.one_hot(labels, 2), 0.1)
      return optax.softmax_cross_entropy(logits, targets).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    images, labels, _ = _object_images(64, seed=100 + i)
    params, state = step(params, state, images, labels)
  return model, params


def _shares(result, methods, boxes):
  return {m: np.mean([explanation.mass_in_box(result[m][i], box, SIZE)
                      for i, box in enumerate(boxes)]) for m in methods}


def test_heatmaps_of_a_trained_model_fall_on_the_object(trained, trained_cls):
  model, params = trained
  images, labels, boxes = _object_images(64, seed=7)
  result = explanation.explainer(model, "avg", explanation.METHODS)(
      params, images, -np.ones(len(images), np.int32))
  assert (result["target"] == labels).mean() >= 0.9           # it learned the task
  assert all(result[m].shape == (64, GRID, GRID) for m in explanation.METHODS)
  chance = 1.0 / (GRID * GRID)                  # a uniform (or random) map's share in the box
  rng = np.random.RandomState(0)
  random_share = np.mean([explanation.mass_in_box(rng.rand(GRID, GRID), b, SIZE)
                          for b in boxes])
  assert abs(random_share - chance) < 0.03
  shares = _shares(result, explanation.METHODS, boxes)
  # Measured with init seeds 0, 1, 2 (docs/method.md, "Heatmaps"): Grad-CAM 0.85, 0.77, 0.89
  # of the mass in a box of 1/16 of the image; gradient x input 0.90, 0.78, 0.74; rollout
  # (mean fusion, none discarded) 0.36, 0.24, 0.20.
  assert all(share > 3 * chance for share in shares.values()), shares
  assert shares["gradcam"] > 0.5 and shares["grad_x_input"] > 0.5, shares
  # A named class: the other emotion's map is another map.
  other = explanation.explainer(model, "avg", ["gradcam"])(params, images, 1 - labels)
  assert (other["target"] == 1 - labels).all()
  assert not np.allclose(other["gradcam"], result["gradcam"])
  # Rollout is class-agnostic: it finds the object only where the pooled token must attend to
  # it, the CLS token (the average-pooled model needs no attention to read a colour). Max
  # fusion and 0.9 discarded: 0.92, 0.94, 0.58 (mean fusion, none discarded: 0.18, 0.16, 0.07).
  model, params = trained_cls
  result = explanation.explainer(model, "token", ["rollout"], "max", 0.9)(
      params, images, -np.ones(len(images), np.int32))
  assert (result["target"] == labels).mean() >= 0.9
  assert _shares(result, ["rollout"], boxes)["rollout"] > 0.5


def _run(*args):
  return subprocess.run([sys.executable, "-m", "uniemox_jax.explain",
                         "--config", "configs/demo_finetune.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=environment.subprocess_env(1))


def test_the_explain_command_writes_maps_a_grid_and_a_listing(trained, tmp_path):
  model, params = trained
  ckpt = str(tmp_path / "ckpt")
  torch_import.write_checkpoint(params, ckpt, {"task": "finetune", "class_names": ["red", "blue"],
                                               "pool": "avg"})
  images, _, _ = _object_images(4, seed=11)
  folder = tmp_path / "images"
  folder.mkdir()
  for i, img in enumerate(images):
    Image.fromarray(img).save(folder / f"{i}.png")
  (folder / "broken.jpg").write_bytes(b"not a jpeg")
  out = tmp_path / "out"
  proc = _run(f"--checkpoint={ckpt}", f"--images={folder}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 images (4 in the grid), 1 unreadable" in proc.stdout
  listing = json.loads((out / "explain.json").read_text())
  assert [r["image"] for r in listing["images"]] == [str(folder / f"{i}.png") for i in range(4)]
  assert listing["unreadable"][0][0] == str(folder / "broken.jpg")
  # The maps are those of the library on the same files through the eval transform.
  seen = np.stack([prediction.eval_image(str(folder / f"{i}.png"), SIZE) for i in range(4)])
  expected = explanation.explainer(model, "avg", explanation.METHODS)(
      params, seen, -np.ones(4, np.int32))
  for m in explanation.METHODS:
    np.testing.assert_allclose(np.load(out / f"{m}.npy"), expected[m], rtol=1e-4, atol=1e-6)
  assert [r["class"] for r in listing["images"]] == [
      ["red", "blue"][int(t)] for t in expected["target"]]
  grid = np.asarray(Image.open(out / "explain.png"))
  assert grid.shape[1] == 4 * 128 + 3 * 4 and grid.shape[0] > 4 * 128      # 4 columns, 4 rows

  bad = [(["--class=green"], "--class 'green': not a class of this model"),
         ([f"--data={tmp_path}"], "give --images DIR or --data DIR"),
         (["--method=rollout,lime"], "--method rollout,lime: choose from")]
  for extra, words in bad:
    proc = _run(f"--checkpoint={ckpt}", f"--images={folder}", f"--out={tmp_path / 'x'}", *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and words in lines[-1] and len(lines) == 1, proc.stderr[-2000:]


def test_the_explain_evaluator_on_a_checkpoint(synthetic_data, tmp_path):
  from configs import demo_finetune
  from data_pipelines import dataset_info
  from uniemox_jax import evaluators
  _, data = synthetic_data
  names = list(dataset_info.DatasetInfo.load(data).class_names)
  model = _model("avg", classes=len(names))
  ckpt = str(tmp_path / "ckpt")
  torch_import.write_checkpoint(_params(model), ckpt, {"task": "finetune", "class_names": names})
  config = demo_finetune.get_config()
  config.data.dir = data
  (result,) = evaluators.evaluate_checkpoint(config, ckpt, ["explain"], split="test",
                                             out_dir=str(tmp_path / "eval"),
                                             progress=False).values()
  (png,) = [f for f in result["files"] if f.endswith("explain_test.png")]
  grid = np.asarray(Image.open(png))
  assert grid.shape[1] == 4 * 128 + 3 * 4 and grid.shape[0] > 8 * 128   # num 8 of the config
  config.evals.explain.target = "nosuch"
  with pytest.raises(errors.UserError, match="config.evals.explain.target 'nosuch'"):
    evaluators.evaluate_checkpoint(config, ckpt, ["explain"], out_dir=str(tmp_path / "e2"))


def test_a_pretraining_checkpoint_maps_its_similarity_to_a_class(synthetic_data, tmp_path):
  from configs import demo
  from data_pipelines import dataset_info
  from uniemox_jax import models
  from uniemox_jax.evaluators import reconstruction, zero_shot
  from uniemox_jax.models.uniemox import UniEmoX
  from uniemox_jax.teacher import loading
  _, data = synthetic_data
  config = demo.get_config()
  model = explanation.unrolled(models.pretrain_model(config.model))
  x, key = jnp.zeros((1, SIZE, SIZE, 3)), jax.random.key(3)
  params = nn.unbox(model.init({"params": key, "mask": key, "dropout": key}, x, x)["params"])
  ckpt = str(tmp_path / "run" / "checkpoints")
  torch_import.write_checkpoint(params, ckpt, {"task": "pretrain"})
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "uniemox_jax.explain", "--config",
                         "configs/demo.py", f"--checkpoint={ckpt}", f"--data={data}",
                         "--num=4", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=environment.subprocess_env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  maps = np.load(out / "similarity.npy")
  assert maps.shape == (4, GRID, GRID) and (maps >= 0).all() and maps.max() > 0

  # The same map in-process, and its class is zero-shot's: gamma's best text embedding.
  teacher = loading.load_teacher(config, str(tmp_path / "run"))      # the one the run made
  names = dataset_info.DatasetInfo.load(data).class_names
  text = zero_shot.class_embeddings(teacher, names)
  views = reconstruction.fixed_images(data, "test", 4, SIZE)
  run = explanation.similarity_explainer(model, text, float(teacher.logit_scale(teacher.params)))
  result = run(params, views["image"], views["person"], -np.ones(4, np.int32))
  np.testing.assert_allclose(maps, result["similarity"], rtol=1e-4, atol=1e-7)
  gamma = model.apply({"params": params}, augment.normalize(views["image"]),
                      augment.normalize(views["person"]), method=UniEmoX.embed)["gamma"]
  gamma = np.asarray(gamma) / np.linalg.norm(gamma, axis=-1, keepdims=True)
  assert (result["target"] == np.argmax(gamma @ text.T, axis=-1)).all()
  listing = json.loads((out / "explain.json").read_text())
  assert [r["class"] for r in listing["images"]] == [names[int(t)] for t in result["target"]]
  other = run(params, views["image"], views["person"], (result["target"] + 1) % len(names))
  assert not np.allclose(other["similarity"], result["similarity"])

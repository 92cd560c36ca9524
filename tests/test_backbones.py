"""transformers' vision backbones as the encoder of fine-tuning and the linear probe (the
reference's baselines), on tiny random models of two families that the tests write with
transformers itself: a ResNet saved by PyTorch (safetensors, converted on load) and a ViT
saved with Flax weights and a preprocessor config of its own normalization."""
import shutil

import jax
import numpy as np
import pytest

from configs import linear_probe as linear_probe_config
from uniemox_jax import augment
from uniemox_jax import finetune
from uniemox_jax import linear_probe
from uniemox_jax import trainer
from uniemox_jax.models import hf_backbone

VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
  import torch
  import transformers
  root = tmp_path_factory.mktemp("backbones")
  torch.manual_seed(0)
  resnet = transformers.ResNetModel(transformers.ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).eval()
  # Running statistics that are not the initial ones: the conversion must carry them.
  with torch.no_grad():
    for m in resnet.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
  resnet.save_pretrained(root / "resnet", safe_serialization=True)
  vit_config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64,
                                      image_size=32, patch_size=8)
  vit = transformers.FlaxViTModel(vit_config, seed=1)
  vit.save_pretrained(root / "vit")
  transformers.ViTImageProcessor(image_mean=list(VIT_MEAN), image_std=list(VIT_STD),
                                 size={"height": 32, "width": 32}).save_pretrained(root / "vit")
  return {"resnet": (str(root / "resnet"), resnet), "vit": (str(root / "vit"), vit)}


def _images(n=3, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def test_features_equal_the_models_own_outputs(backbones):
  import torch
  images = _images()
  ours = np.asarray(augment.normalize(images))                  # ImageNet, as every model here
  path, resnet = backbones["resnet"]
  spec = hf_backbone.backbone_spec(path)
  assert spec.family == "resnet" and spec.mean == augment.IMAGENET_MEAN
  got = hf_backbone.features(spec, hf_backbone.load_variables(path), ours)
  with torch.no_grad():
    want = resnet(torch.from_numpy(ours.transpose(0, 3, 1, 2).copy())).pooler_output
  np.testing.assert_allclose(np.asarray(got), want.reshape(3, -1).numpy(), rtol=1e-4, atol=1e-5)

  path, vit = backbones["vit"]
  spec = hf_backbone.backbone_spec(path)
  assert spec.family == "vit" and spec.mean == VIT_MEAN
  got = hf_backbone.features(spec, hf_backbone.load_variables(path), ours)
  # transformers' ViT on its own normalization (0.5, 0.5): the CLS token after the final norm.
  theirs = np.asarray(augment.normalize(images, VIT_MEAN, VIT_STD)).transpose(0, 3, 1, 2)
  want = vit(theirs).last_hidden_state[:, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_fine_tuning_a_resnet_from_pytorch_weights(backbones, pretrained, tmp_path,
                                                   finetune_config):
  path, _ = backbones["resnet"]
  config = finetune_config(**{"model.backbone": path, "init.encoder": "",
                              "optim.layer_decay": 1.0, "total_steps": 6,
                              "eval_every_steps": 3, "checkpoint.every_steps": 100})
  loop = trainer.build(config, str(tmp_path), finetune.make_task)
  try:
    loop.run()
    result = loop.task.after_training(loop)
    state = jax.device_get(loop.final_state)
  finally:
    loop.close()
  assert result["test"]["num_examples"] == 32 and 0 <= result["test"]["top1"] <= 1
  start = hf_backbone.load_variables(path)
  trained = state["params"]["backbone"]
  # The BatchNorm statistics stay as converted; the convolutions were trained.
  jax.tree.map(np.testing.assert_array_equal, trained["batch_stats"], start["batch_stats"])
  kernels = [(a, b) for a, b in zip(jax.tree.leaves(trained["params"]),
                                    jax.tree.leaves(start["params"])) if a.ndim == 4]
  assert kernels and any(not np.array_equal(a, b) for a, b in kernels)
  assert set(state["params"]) == {"backbone", "head"}


def test_linear_probe_of_a_vit_backbone(backbones, pretrained, tmp_path):
  path, _ = backbones["vit"]
  config = linear_probe_config.get_config(f"demo=True,pretrained={pretrained}")
  config.model.backbone = path
  config.init.encoder = ""
  config.probe.steps = 100
  result = linear_probe.linear_probe(config, str(tmp_path))
  assert result["test"]["num_examples"] == 32 and result["test"]["checkpoint"] == path
  assert result["best_weight_decay"] in config.probe.weight_decays


def test_backbone_mistakes_are_named(backbones, tmp_path, finetune_config, pretrained):
  import transformers
  from uniemox_jax import models
  vit_path, _ = backbones["vit"]
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"backbone directory .*empty' lacks config.json "
                     "or a weight file"):
    hf_backbone.backbone_spec(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match=r"backbone directory .*nowhere' does not exist "
                     r"\(config.model.backbone"):
    hf_backbone.backbone_spec(str(tmp_path / "nowhere"))
  bert = tmp_path / "bert"
  transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=8).save_pretrained(bert)
  (bert / "flax_model.msgpack").write_bytes(b"")
  with pytest.raises(ValueError, match=r"is a 'bert' model; the vision backbones with Flax "
                     r"models in transformers are \['beit', 'dinov2', 'regnet', 'resnet', "
                     r"'vit'\]"):
    hf_backbone.backbone_spec(str(bert))
  # PyTorch weights that lack an array of the model: named, not left at a random init.
  from safetensors.numpy import load_file, save_file
  resnet_path, _ = backbones["resnet"]
  lacking = tmp_path / "lacking_resnet"
  shutil.copytree(resnet_path, lacking)
  weights = load_file(lacking / "model.safetensors")
  dropped = [k for k in weights if k.endswith("convolution.weight")][0]
  save_file({k: v for k, v in weights.items() if k != dropped}, lacking / "model.safetensors",
            metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"the checkpoint of config.model.backbone=.*lacking_resnet"
                     r".* \(transformers' resnet model\) does not fit the model:\n  missing "
                     r"params/embedder/embedder/convolution/kernel"):
    hf_backbone.load_variables(str(lacking))
  config = finetune_config(**{"model.backbone": vit_path, "model.image_size": 48})
  with pytest.raises(ValueError, match=r"config.model.image_size=48, but the backbone .* "
                     r"\(vit\) takes 32 px images"):
    models.classification_model(config.model, 8)
  with pytest.raises(ValueError, match=r"config.init.encoder .* must be empty"):
    finetune.step_task(finetune_config(**{"model.backbone": vit_path}), 8, False)
  with pytest.raises(ValueError, match=r"config.optim.layer_decay=0.75 .*set "
                     r"--config.optim.layer_decay=1.0"):
    finetune.step_task(finetune_config(**{"model.backbone": vit_path, "init.encoder": "",
                                          "optim.layer_decay": 0.75}), 8, False)

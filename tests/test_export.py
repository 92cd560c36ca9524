"""Export to where PyTorch users work, checked by the real consumers: timm builds the exported
folder and gives our logits; the MAE-layout .pth loads with torch's default loader into a module
of MAE's structure, and imports back bit for bit."""
import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import torch_export
from uniemox_jax import torch_import
from uniemox_jax.models import classifier
from uniemox_jax.models import surgery
from uniemox_jax.models import uniemox
from uniemox_jax.models import vit
from uniemox_jax.tools import import_torch as import_command
from tests import environment

TOL = 1e-4
SIZE, NAMES = 32, ["amusement", "awe", "contentment", "excitement", "anger"]


def _perturbed(params, seed=0):
  """Random values everywhere (the heads start at 2e-5 and the norms at 1 / 0: too easy)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.05 * rng.randn(*x.shape).astype(np.float32)
                                   for x in leaves])


def _images(n=3, seed=1):
  raw = np.random.RandomState(seed).randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)
  return np.asarray(augment.normalize(jnp.asarray(raw)))


def _nchw(x):
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _classifier(pool, pos_embed, scan):
  model = classifier.Classifier(len(NAMES), "mu/8", SIZE, pos_embed=pos_embed, pool=pool,
                                student=vit.StudentConfig(scan=scan))
  variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  return model, _perturbed(jax.tree.map(np.asarray, nn.unbox(variables["params"])))


def _pretrained(scan=False):
  model = uniemox.UniEmoX("mu/8", SIZE, decoder_width=32, decoder_depth=1, decoder_heads=2,
                          student=vit.StudentConfig(scan=scan))
  x = jnp.zeros((1, SIZE, SIZE, 3))
  variables = model.init({"params": jax.random.key(0), "mask": jax.random.key(1),
                          "dropout": jax.random.key(2)}, x, x)
  return model, _perturbed(jax.tree.map(np.asarray, nn.unbox(variables["params"])))


def _checkpoint(tmp_path, params, meta, name="ckpt"):
  out = str(tmp_path / name)
  torch_import.write_checkpoint(params, out, meta)
  return out


@pytest.mark.parametrize("pool,pos_embed,scan", [("avg", "learned", False),
                                                 ("token", "sincos", True)])
def test_a_classifier_exported_for_timm_gives_our_logits_in_timm(tmp_path, pool, pos_embed,
                                                                  scan):
  model, params = _classifier(pool, pos_embed, scan)
  ckpt = _checkpoint(tmp_path, params, {"task": "finetune", "class_names": NAMES,
                                        "dataset": "emo8", "pool": pool})
  out = tmp_path / "timm"
  done = torch_export.export(ckpt, "timm", str(out), image_size=SIZE)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert len(done.files) == 2
  x = _images()
  ours, _ = model.apply({"params": params}, jnp.asarray(x))

  theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  with torch.no_grad():
    logits = theirs(_nchw(x)).numpy()
  assert np.abs(logits - np.asarray(ours)).max() < TOL
  cfg = theirs.pretrained_cfg
  assert cfg["label_names"] == NAMES and cfg["num_classes"] == len(NAMES)
  assert theirs.global_pool == pool and tuple(cfg["input_size"]) == (3, SIZE, SIZE)
  data = timm.data.resolve_data_config({}, model=theirs)
  assert tuple(data["mean"]) == augment.IMAGENET_MEAN and tuple(data["std"]) == augment.IMAGENET_STD
  assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic"


def test_the_architecture_names_are_timm_models():
  for name in (*torch_export.TIMM_ARCHITECTURES.values(), torch_export.DEFAULT_ARCHITECTURE):
    assert timm.is_model(name), name
  assert torch_export.TIMM_ARCHITECTURES["L/16"] == "vit_large_patch16_224"


def test_a_pretraining_checkpoint_gives_timm_its_encoder(tmp_path):
  model, params = _pretrained(scan=True)
  ckpt = _checkpoint(tmp_path, params, {"task": "pretrain"})
  done = torch_export.export(ckpt, "timm", str(tmp_path / "timm"), image_size=SIZE)
  assert any("left out decoder, fuse" in n for n in done.notes)
  x = _images()
  unrolled = surgery.to_layout(params, scanned=False)
  tokens, _ = vit.Encoder("mu/8", SIZE).apply({"params": unrolled["encoder"]}, jnp.asarray(x))
  theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
  assert theirs.num_classes == 0
  with torch.no_grad():
    features = theirs(_nchw(x)).numpy()
  assert np.abs(features - np.asarray(tokens[:, 0])).max() < TOL


LN = functools.partial(torch.nn.LayerNorm, eps=1e-6)


class _MaeLayout(torch.nn.Module):
  """facebookresearch/mae's MaskedAutoencoderViT, its modules and names (models_mae.py, which
  the authors' code keeps); enough to load a state dict strictly and run the encoder."""

  def __init__(self, width=64, depth=2, heads=2, mlp_ratio=2.0, dec_width=32, dec_depth=1,
               dec_heads=2, patch=8):
    super().__init__()
    self.patch_embed = PatchEmbed(SIZE, patch, 3, width)
    n = self.patch_embed.num_patches
    self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = torch.nn.Parameter(torch.zeros(1, n + 1, width), requires_grad=False)
    self.blocks = torch.nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias=True,
                                             norm_layer=LN) for _ in range(depth)])
    self.norm = LN(width)
    self.decoder_embed = torch.nn.Linear(width, dec_width)
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dec_width))
    self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, n + 1, dec_width),
                                                requires_grad=False)
    self.decoder_blocks = torch.nn.ModuleList([Block(dec_width, dec_heads, 4.0, qkv_bias=True,
                                                     norm_layer=LN) for _ in range(dec_depth)])
    self.decoder_norm = LN(dec_width)
    self.decoder_pred = torch.nn.Linear(dec_width, patch * patch * 3)

  def encode(self, x):
    x = self.patch_embed(x) + self.pos_embed[:, 1:]
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class _AttentionFusion(torch.nn.Module):
  """The authors' default fusion module (models/attention_fusion.py): its names and forward."""

  def __init__(self, width=32):
    super().__init__()
    self.linear = torch.nn.Linear(width, width)
    self.bn = torch.nn.LayerNorm(width)

  def forward(self, a, b):
    return torch.nn.functional.elu(self.linear(self.bn(a) + self.bn(b)))


def test_a_pretraining_checkpoint_exported_as_mae_loads_in_torch_and_imports_back(tmp_path):
  model, params = _pretrained(scan=False)
  ckpt = _checkpoint(tmp_path, params, {"task": "pretrain"})
  # The input size of a model with the fixed table comes from its run's config.json.
  (tmp_path / "config.json").write_text('{"model": {"image_size": %d}}' % SIZE)
  out = tmp_path / "mae"
  torch_export.export(ckpt, "mae", str(out))
  pth = out / "checkpoint-0.pth"
  loaded = torch.load(pth)       # torch's default: the weights-only loader
  assert set(loaded) == {"model", "att_fusion"}       # as the authors' script saves them
  mae = _MaeLayout().eval()
  mae.load_state_dict(loaded["model"], strict=True)     # every key, every shape
  fusion = _AttentionFusion().eval()
  fusion.load_state_dict(loaded["att_fusion"], strict=True)
  x = _images()
  tokens, _ = vit.Encoder("mu/8", SIZE).apply({"params": params["encoder"]}, jnp.asarray(x))
  a, b = np.random.RandomState(5).randn(2, 3, 32).astype(np.float32)
  ours = model.apply({"params": params}, jnp.asarray(a), jnp.asarray(b),
                     method=lambda m, a, b: m.fuse(a, b))
  with torch.no_grad():
    assert np.abs(mae.encode(_nchw(x)).numpy() - np.asarray(tokens)).max() < TOL
    assert np.abs(fusion(torch.from_numpy(a), torch.from_numpy(b)).numpy()
                  - np.asarray(ours)).max() < TOL

  back = tmp_path / "imported"
  assert import_command.main(["--src", str(pth), "--kind", "uniemox_pretrain", "--vit", "mu/8",
                              "--image_size", str(SIZE), "--decoder_heads", "2",
                              "--out", str(back)]) == 0
  again = checkpointing.Checkpoint.open(str(back)).read(("params",))
  flat = lambda t: {"/".join(str(k.key) for k in path): v  # noqa: E731
                    for path, v in jax.tree_util.tree_leaves_with_path(t)}
  assert sorted(flat(again)) == sorted(flat(params))
  for key, value in flat(params).items():
    assert np.array_equal(flat(again)[key], value), key     # bit for bit


def test_a_classifier_exported_as_mae_imports_back(tmp_path):
  _, params = _classifier("avg", "learned", False)
  ckpt = _checkpoint(tmp_path, params, {"task": "finetune", "class_names": NAMES})
  torch_export.export(ckpt, "mae", str(tmp_path / "mae"))     # the size from the table
  sd = torch_import.load_state_dict(str(tmp_path / "mae" / "checkpoint-0.pth"))
  again, report = torch_import.convert(sd, "uniemox_finetune", "mu/8", SIZE)
  report.check()
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    got = again
    for k in path:
      got = got[k.key]
    assert np.array_equal(got, value)


def _export_command(*args):
  return subprocess.run([sys.executable, "-m", "uniemox_jax.tools.export", *args],
                        capture_output=True, text=True, env=environment.subprocess_env(),
                        timeout=300)


def test_the_command_writes_and_refuses_in_one_line(tmp_path):
  _, params = _classifier("avg", "learned", False)
  ckpt = _checkpoint(tmp_path, params, {"task": "finetune", "class_names": NAMES})
  ok = _export_command("--checkpoint", ckpt, "--format", "timm", "--out", str(tmp_path / "t"))
  assert ok.returncode == 0, ok.stderr
  assert "wrote: " in ok.stdout and "model.safetensors" in ok.stdout

  _, pre = _pretrained()
  fused = dict(pre, fuse={"gate": pre["fuse"]["proj"], **pre["fuse"]})
  other_fusion = _checkpoint(tmp_path, fused, {"task": "pretrain"}, "other_fusion")
  encoder_only = _checkpoint(tmp_path, {"encoder": pre["encoder"]}, {}, "encoder_only")
  cases = [
      (["--checkpoint", ckpt, "--format", "onnx", "--out", str(tmp_path / "x")], "--format"),
      (["--checkpoint", str(tmp_path / "nowhere"), "--format", "timm", "--out",
        str(tmp_path / "y")], "nowhere"),
      (["--checkpoint", ckpt, "--format", "timm", "--out", str(tmp_path / "t")],
       "is not empty"),
      (["--checkpoint", other_fusion, "--format", "mae", "--out", str(tmp_path / "z")],
       "only the method's default fusion"),
      (["--checkpoint", encoder_only, "--format", "mae", "--out", str(tmp_path / "w")],
       "use --format timm"),
  ]
  for args, words in cases:
    bad = _export_command(*args)
    lines = [l for l in bad.stderr.splitlines() if l.strip()]
    assert bad.returncode == 2, (args, bad.stderr)
    assert words in lines[-1] and len(lines) == 1, (args, bad.stderr)
  assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json",
                                                               "model.safetensors"]
  assert not (tmp_path / "z").exists() and not (tmp_path / "w").exists()

"""PyTorch checkpoint import: timm ViTs and MAE-layout state dicts against PyTorch's own
forward, the fusion, position resampling, the output checkpoint, the trainer hook, errors."""
import argparse
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from configs import demo_finetune
from configs import linear_probe as linear_probe_config
from data_pipelines import dataset_info
from uniemox_jax import checkpointing
from uniemox_jax import evaluators
from uniemox_jax import finetune
from uniemox_jax import importers
from uniemox_jax import linear_probe
from uniemox_jax import torch_import as it
from uniemox_jax import trainer
from uniemox_jax.evaluators import classification
from uniemox_jax.models import classifier
from uniemox_jax.models import decoder as decoder_lib
from uniemox_jax.models import fusion
from uniemox_jax.models import vit
from uniemox_jax.tools import import_torch as import_command
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
LN = functools.partial(torch.nn.LayerNorm, eps=1e-6)


def _perturb(module, seed=0):
  """Random weights (timm's init leaves biases and norms at 0 / 1: too easy)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return module.eval()


def _timm_vit(**kw):
  args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
              qkv_bias=True, norm_layer=LN)
  args.update(kw)
  return _perturb(VisionTransformer(**args))


def _sd(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _images(n=2, size=32, seed=0):
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def _torch_in(x):
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _template(module, *args):
  return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])


def test_timm_classifier_matches_pytorch():
  m = _timm_vit(global_pool="avg", fc_norm=True, num_classes=5)
  params, report = it.convert(_sd(m), "vit", "mu/8", 32, source="timm")
  model = classifier.Classifier(5, "mu/8", 32, pos_embed="learned")
  x = _images()
  params = it.fit_to(params, _template(model, jnp.asarray(x)), report)
  report.check()
  assert not report.dropped and "pos_embed" in report.loaded
  ours, _ = model.apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    ref = m(_torch_in(x)).numpy()
  assert np.abs(np.asarray(ours) - ref).max() < TOL


def test_timm_default_classifier_pools_its_cls_token():
  # timm's default ViT: final norm, then the CLS token, no fc_norm.
  m = _timm_vit(num_classes=5)
  params, report = it.convert(_sd(m), "vit", "mu/8", 32, source="timm")
  assert "norm" in params["encoder"] and "fc_norm" not in params
  model = classifier.Classifier(5, "mu/8", 32, pos_embed="learned", pool="token")
  x = _images()
  params = it.fit_to(params, _template(model, jnp.asarray(x)), report)
  report.check()
  ours, _ = model.apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    ref = m(_torch_in(x)).numpy()
  assert np.abs(np.asarray(ours) - ref).max() < TOL
  # An unknown pooling is refused by name.
  with pytest.raises(ValueError, match="pool"):
    classifier.Classifier(5, "mu/8", 32, pool="cls").init(jax.random.key(0), jnp.asarray(x))


def test_size_detection_refuses_what_the_shapes_do_not_settle(tmp_path):
  sd = _sd(_timm_vit())
  assert it.variant_of(sd, "f") == "mu/8"
  # Same width and depth as a known size, another MLP width: another model; its heads unknown.
  with pytest.raises(ValueError, match=r"another MLP width.*pass --vit"):
    it.variant_of(_sd(_timm_vit(mlp_ratio=3)), "f")
  with pytest.raises(ValueError, match="no known ViT size"):
    it.variant_of(_sd(_timm_vit(depth=3)), "f")
  # MAE's script saves its argparse args beside the weights: they load, and their model name
  # must agree with the shapes.
  m = _timm_vit()
  path = tmp_path / "mae_style.pth"
  torch.save({"model": m.state_dict(), "args": argparse.Namespace(model="mae_vit_large_patch16"),
              "epoch": 3}, path)
  loaded = it.load_state_dict(str(path))
  assert loaded.model_name == "mae_vit_large_patch16" and set(loaded) == set(m.state_dict())
  with pytest.raises(ValueError, match=r"names its model 'mae_vit_large_patch16' \(L\)"):
    it.variant_of(loaded, str(path))
  # A relative position table carries the head count: one that disagrees is refused.
  sd = dict(_sd(m), **{"blocks.0.attn.relative_position_bias_table": np.zeros((10, 3))})
  with pytest.raises(ValueError, match="has 3 heads, the mu size has 2"):
    it.variant_of(sd, "f")


@pytest.mark.parametrize("scan", [False, True])
def test_timm_encoder_tokens_match_pytorch(scan):
  m = _timm_vit(num_classes=0)        # CLS pooling: the final norm is the encoder's
  params, report = it.convert(_sd(m), "vit", "mu/8", 32)
  enc = vit.Encoder("mu/8", 32, pos_embed="learned", student=vit.StudentConfig(scan=scan))
  x = _images(seed=1)
  encoder = it.fit_to(params["encoder"], _template(enc, jnp.asarray(x)), report)
  report.check()
  tokens, _ = enc.apply({"params": encoder}, jnp.asarray(x))
  with torch.no_grad():
    ref = m.forward_features(_torch_in(x)).numpy()
  assert np.abs(np.asarray(tokens) - ref).max() < TOL


def _mae_state_dict(width=64, depth=2, heads=2, dec_width=32, dec_depth=1, dec_heads=2,
                    grid=4, patch=8, fusion_prefix=None):
  """A random state dict in facebookresearch/mae's layout (+ the authors' fusion)."""
  enc = _timm_vit(embed_dim=width, depth=depth, num_heads=heads, img_size=grid * patch,
                  patch_size=patch, num_classes=0)
  with torch.no_grad():     # MAE's encoder table is the fixed sin-cos one
    enc.pos_embed.copy_(torch.from_numpy(vit.sincos_2d(width, grid, cls_token=True)[None]))
  sd = {k: v for k, v in _sd(enc).items() if not k.startswith("head")}
  torch.manual_seed(1)
  dec_blocks = [_perturb(Block(dec_width, dec_heads, 4.0, qkv_bias=True, norm_layer=LN), i)
                for i in range(dec_depth)]
  for i, b in enumerate(dec_blocks):
    sd.update({f"decoder_blocks.{i}.{k}": v for k, v in _sd(b).items()})
  rng = np.random.RandomState(2)
  sd["decoder_embed.weight"] = rng.randn(dec_width, width).astype(np.float32) * 0.1
  sd["decoder_embed.bias"] = rng.randn(dec_width).astype(np.float32) * 0.1
  sd["mask_token"] = rng.randn(1, 1, dec_width).astype(np.float32)
  sd["decoder_pos_embed"] = vit.sincos_2d(dec_width, grid, cls_token=True)[None].astype(
      np.float32)
  sd["decoder_norm.weight"] = 1 + 0.1 * rng.randn(dec_width).astype(np.float32)
  sd["decoder_norm.bias"] = 0.1 * rng.randn(dec_width).astype(np.float32)
  sd["decoder_pred.weight"] = 0.1 * rng.randn(patch * patch * 3, dec_width).astype(np.float32)
  sd["decoder_pred.bias"] = 0.1 * rng.randn(patch * patch * 3).astype(np.float32)
  if fusion_prefix:
    sd[fusion_prefix + "linear.weight"] = 0.1 * rng.randn(dec_width, dec_width).astype(
        np.float32)
    sd[fusion_prefix + "linear.bias"] = 0.1 * rng.randn(dec_width).astype(np.float32)
    sd[fusion_prefix + "bn.weight"] = 1 + 0.1 * rng.randn(dec_width).astype(np.float32)
    sd[fusion_prefix + "bn.bias"] = 0.1 * rng.randn(dec_width).astype(np.float32)
  return enc, dec_blocks, sd


def test_mae_layout_encoder_and_decoder_match_pytorch():
  enc_t, dec_blocks, sd = _mae_state_dict()
  params, report = it.convert(sd, "mae", "mu/8", 32, decoder_heads=2)
  report.check()
  assert set(report.dropped) == {"pos_embed", "decoder_pos_embed"}     # fixed tables
  x = _images(seed=3)
  enc = vit.Encoder("mu/8", 32)
  encoder = it.fit_to(params["encoder"], _template(enc, jnp.asarray(x)), report)
  report.check()
  tokens, _ = enc.apply({"params": encoder}, jnp.asarray(x))
  with torch.no_grad():
    ref_tokens = enc_t.forward_features(_torch_in(x))
  assert np.abs(np.asarray(tokens) - ref_tokens.numpy()).max() < TOL

  # The decoder on every patch (nothing masked), against MAE's forward_decoder.
  dec = decoder_lib.MaskDecoder(16, 8, width=32, depth=1, heads=2)
  ids = jnp.tile(jnp.arange(16)[None], (2, 1))
  latent = jnp.asarray(ref_tokens.numpy())
  tmpl = nn.unbox(jax.eval_shape(
      lambda: dec.init(jax.random.key(0), jnp.zeros((2, 17, 32)), ids))["params"])
  tmpl["embed"] = {"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros((32,))}
  decoder = it.fit_to(params["decoder"], tmpl, report)
  report.check()
  projected = dec.apply({"params": decoder}, latent, method=decoder_lib.MaskDecoder.project)
  pred = dec.apply({"params": decoder}, projected, ids)
  with torch.no_grad():
    y = ref_tokens @ torch.from_numpy(sd["decoder_embed.weight"]).T + torch.from_numpy(
        sd["decoder_embed.bias"])
    y = y + torch.from_numpy(sd["decoder_pos_embed"])
    for b in dec_blocks:
      y = b(y)
    y = torch.nn.functional.layer_norm(y, (32,), torch.from_numpy(sd["decoder_norm.weight"]),
                                       torch.from_numpy(sd["decoder_norm.bias"]), 1e-6)
    y = y @ torch.from_numpy(sd["decoder_pred.weight"]).T + torch.from_numpy(
        sd["decoder_pred.bias"])
  assert np.abs(np.asarray(pred) - y[:, 1:].numpy()).max() < TOL


def test_uniemox_pretrain_fusion_matches_pytorch():
  _, _, sd = _mae_state_dict(fusion_prefix="module.fusion_model.")
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
  params, report = it.convert(sd, "uniemox_pretrain", "mu/8", 32, decoder_heads=2)
  report.check()
  a, b = np.random.RandomState(4).randn(2, 3, 32).astype(np.float32)
  ours = fusion.get_fusion("easy")().apply({"params": params["fuse"]}, jnp.asarray(a),
                                           jnp.asarray(b))
  w = torch.from_numpy(sd["fusion_model.bn.weight"])
  bias = torch.from_numpy(sd["fusion_model.bn.bias"])
  # The authors' module is nn.LayerNorm(dim): torch's default epsilon, 1e-5.
  ln = lambda t: torch.nn.functional.layer_norm(t, (32,), w, bias, 1e-5)  # noqa: E731
  with torch.no_grad():
    z = ln(torch.from_numpy(a)) + ln(torch.from_numpy(b))
    ref = torch.nn.functional.elu(z @ torch.from_numpy(sd["fusion_model.linear.weight"]).T
                                  + torch.from_numpy(sd["fusion_model.linear.bias"]))
  assert np.abs(np.asarray(ours) - ref.numpy()).max() < TOL
  # Without a fusion, a UniEmoX pretraining import names what is missing.
  no_fusion = {k: v for k, v in sd.items() if "fusion" not in k}
  _, report = it.convert(no_fusion, "uniemox_pretrain", "mu/8", 32, decoder_heads=2)
  with pytest.raises(ValueError, match="missing the fusion"):
    report.check()


def test_position_table_resampling():
  table = vit.sincos_2d(64, 4, cls_token=True)[None]
  np.testing.assert_array_equal(it.resample_pos_embed(table, 4), table)
  bigger = it.resample_pos_embed(table, 6)
  assert bigger.shape == (1, 37, 64)
  np.testing.assert_array_equal(bigger[:, 0], table[:, 0])
  flat = np.ones((1, 17, 8), np.float32)
  np.testing.assert_allclose(it.resample_pos_embed(flat, 3), np.ones((1, 10, 8)), atol=1e-5)
  # A 32-px checkpoint into a 48-px classifier: the table is resampled and reported.
  m = _timm_vit(global_pool="avg", fc_norm=True, num_classes=5)
  params, report = it.convert(_sd(m), "vit", "mu/8", 48)
  assert params["encoder"]["pos_embed"].shape == (1, 37, 64)
  assert any("resampled from 16 to 36" in n for n in report.notes)


def test_bad_files_and_mismatches_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    it.load_state_dict(str(tmp_path / "none.pth"))
  m = _timm_vit(global_pool="avg", fc_norm=True, num_classes=5)
  good = tmp_path / "vit.pth"
  torch.save({"model": m.state_dict()}, good)
  assert set(it.load_state_dict(str(good))) == set(m.state_dict())
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  with pytest.raises(ValueError, match="truncated.pth is not a readable PyTorch checkpoint"):
    it.load_state_dict(str(truncated))
  text = tmp_path / "notes.pth"
  text.write_text("hello")
  with pytest.raises(ValueError, match="notes.pth is not a readable PyTorch checkpoint"):
    it.load_state_dict(str(text))
  # The command says it in one line and exits 2, no traceback.
  proc = subprocess.run([sys.executable, "-m", "uniemox_jax.tools.import_torch", "--src",
                         str(text), "--kind", "vit", "--out", str(tmp_path / "out")],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=environment.subprocess_env(1))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and \
      "notes.pth is not a readable PyTorch checkpoint" in proc.stderr
  assert "Traceback" not in proc.stderr
  # A B/16 file into a mu/8 model: every mis-shaped array named; an extra key named too.
  sd = _sd(m)
  sd["blocks.0.ls1.gamma"] = np.ones(64, np.float32)
  sd.pop("blocks.1.mlp.fc2.bias")
  params, report = it.convert(sd, "vit", "mu/8", 32)
  tmpl = _template(classifier.Classifier(7, "mu/8", 32, pos_embed="learned"),
                   jnp.zeros((1, 32, 32, 3)))
  it.fit_to(params, tmpl, report)
  with pytest.raises(ValueError) as err:
    report.check()
  msg = str(err.value)
  assert "unexpected key blocks.0.ls1.gamma" in msg
  assert "missing encoder/transformer/block_1/mlp/fc2/bias" in msg
  assert "head/kernel: file shape (64, 5) != model shape (64, 7)" in msg


def test_import_cli_checkpoint_evaluates_and_fine_tunes(tmp_path, synthetic_data):
  _, data = synthetic_data
  names = list(dataset_info.DatasetInfo.load(data).class_names)
  m = _timm_vit(global_pool="avg", fc_norm=True, num_classes=len(names))
  src = tmp_path / "uniemox_emo8.pth"
  torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, src)
  out = tmp_path / "imported"
  assert import_command.main(["--src", str(src), "--kind", "uniemox_finetune", "--image_size",
                              "32", "--out", str(out), "--class_names", ",".join(names)]) == 0
  config = demo_finetune.get_config()
  config.unlock()
  config.update_from_flattened_dict({"data.dir": data, "eval_batch_size": 16})
  result = evaluators.evaluate_checkpoint(config, str(out), ["classification"], split="test",
                                          out_dir=str(tmp_path), progress=False)
  assert result["classification"]["num_examples"] == 16
  # The same scores as PyTorch on the eval crops.
  meta = checkpointing.Checkpoint.open(str(out)).meta
  assert meta["class_names"] == names
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    import_command.main(["--src", str(src), "--kind", "uniemox_finetune", "--image_size", "32",
                         "--out", str(out)])

  assert meta["pool"] == "avg"
  # timm's default (CLS-token) classifier: recorded, and evaluated with that pooling although
  # the config says avg.
  token = _timm_vit(num_classes=len(names))
  torch.save(token.state_dict(), tmp_path / "timm_default.pth")
  assert import_command.main(["--src", str(tmp_path / "timm_default.pth"), "--kind", "vit",
                              "--image_size", "32", "--out", str(tmp_path / "token"),
                              "--class_names", ",".join(names)]) == 0
  token = checkpointing.Checkpoint.open(str(tmp_path / "token"))
  assert token.meta["pool"] == "token"
  assert config.model.pool == "avg"
  assert classification.with_checkpoint_pool(config, token).model.pool == "token"
  result = evaluators.evaluate_checkpoint(config, str(tmp_path / "token"), ["classification"],
                                          split="test", out_dir=str(tmp_path / "token_eval"),
                                          progress=False)
  assert result["classification"]["num_examples"] == 16
  # The imported checkpoint is an encoder source like any checkpoint written here.
  encoder = importers.ENCODER_IMPORTERS["uniemox_jax"](str(out), None)
  np.testing.assert_array_equal(encoder["cls_token"], m.state_dict()["cls_token"].numpy())
  # The trainer reads the .pth directly through its importer hook.
  config.update_from_flattened_dict({"init.encoder": str(src),
                                     "init.encoder_format": "torch_uniemox_finetune"})
  t = trainer.build(config, str(tmp_path / "ft"), finetune.make_task)
  state = t.initial_state(None)
  t.close()
  got = jax.device_get(state["params"]["encoder"]["transformer"]["block_1"]["mlp"]["fc1"])
  np.testing.assert_array_equal(got["kernel"], m.state_dict()["blocks.1.mlp.fc1.weight"].numpy().T)
  assert "torch_mae" in importers.ENCODER_IMPORTERS


def test_the_linear_probe_task_reads_a_pth_encoder(tmp_path, synthetic_data):
  """The linear-probe task with a torch_* encoder format: the importer is handed the
  encoder's template (it was handed None, and `"pos_embed" in template` raised)."""
  _, data = synthetic_data
  src = tmp_path / "timm_vit.pth"
  torch.save(_timm_vit(num_classes=8).state_dict(), src)
  config = linear_probe_config.get_config("demo=True")
  config.update_from_flattened_dict({
      "data.dir": data, "init.encoder": str(src), "init.encoder_format": "torch_vit",
      "probe.steps": 20, "probe.weight_decays": (0.0,), "eval_batch_size": 16})
  result = linear_probe.linear_probe(config, str(tmp_path / "probe"))
  assert result["test"]["num_examples"] == 16 and result["best_weight_decay"] == 0.0

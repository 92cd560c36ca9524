"""Fine-tuning from the demo encoder: layer-wise lr decay, best-state selection and exact
resume, the checks before the first step, preemption."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_finetune
from uniemox_jax import checkpointing
from uniemox_jax import finetune
from uniemox_jax import models
from uniemox_jax import optim
from uniemox_jax import trainer



@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_gives_each_block_its_multiplier(scan):
  cfg = demo_finetune.get_config()
  cfg.model.update(variant="Ti/16", image_size=32, scan=scan)
  model = models.classification_model(cfg.model, 8)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda x: np.ones(x.shape, np.float32), params)
  params = __import__("flax").linen.unbox(params)
  depth, decay = 12, 0.75
  mult = optim.layerwise_multipliers(params, depth, decay)
  enc = mult["encoder"]
  assert float(enc["patch_embed"]["proj"]["kernel"]) == pytest.approx(decay ** 13)
  assert float(enc["cls_token"]) == pytest.approx(decay ** 13)
  assert float(mult["head"]["kernel"]) == 1.0 and float(mult["fc_norm"]["scale"]) == 1.0
  for i in range(depth):
    if scan:
      got = np.asarray(enc["transformer"]["blocks"]["attn"]["qkv"]["kernel"])[i].ravel()
    else:
      got = [float(x) for x in jax.tree.leaves(enc["transformer"][f"block_{i}"])]
    np.testing.assert_allclose(got, decay ** (depth - i), rtol=1e-6)

  # The optimizer applies them: one step's update of each leaf is the plain update x its
  # multiplier (AdamW's update is linear in the learning rate).
  cfg.optim.update(weight_decay=0.05)
  grads = jax.tree.map(lambda x: np.full(x.shape, 0.3, np.float32), params)
  plain = optim.make_optimizer(cfg, 1e-3)
  scaled = optim.make_optimizer(cfg, 1e-3, mult)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_scaled, _ = scaled.update(grads, scaled.init(params), params)
  jax.tree.map(lambda a, b, m: np.testing.assert_allclose(a, np.asarray(b) * m, rtol=1e-5),
               u_scaled, u_plain, jax.tree.map(np.asarray, mult))


def test_demo_pretraining_loss_falls(pretrained):
  logged = [json.loads(line) for line in open(os.path.join(pretrained, "metrics.jsonl"))]
  assert [m["step"] for m in logged] == list(range(5, 61, 5))
  for m in logged:
    assert {"l1", "l2", "l3", "total", "grad_norm", "learning_rate"} <= set(m)
  totals = [m["total"] for m in logged]
  assert np.mean(totals[-3:]) < 0.6 * totals[0], totals      # 3.12 -> 1.46 when written


def test_finetune_beats_chance_and_keeps_the_best_state(finetuned):
  workdir, config, result = finetuned
  test = result["test"]
  assert test["num_examples"] == 32 and test["top1"] >= 2 / 8, test
  best = json.load(open(os.path.join(workdir, finetune.BEST_FILE)))
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  # Validation is an evaluator like any other: its scalars "validation/<metric>".
  val = {m["step"]: m["validation/top1"] for m in logged if "validation/top1" in m}
  assert len(val) == 5                       # every 2 epochs of 4 steps, 40 steps
  periodic = {m["step"]: m["classification/top1"] for m in logged
              if "classification/top1" in m}
  assert sorted(periodic) == [20, 40]
  assert periodic[40] == pytest.approx(json.load(open(os.path.join(
      workdir, "evaluations", "checkpoints-40", "classification", "test_results.json")))["top1"])
  assert best["value"] == max(val.values())
  assert best["step"] == min(s for s, v in val.items() if v == best["value"])
  assert checkpointing.Checkpointer(os.path.join(workdir, "best"), read_only=True
                                    ).all_steps() == [best["step"]]
  # The best state's test report, where any evaluation of that checkpoint goes.
  report_dir = os.path.join(workdir, "evaluations", f"best-{best['step']}", "classification")
  for name in ("test_results.json", "test_confusion.json", "test_confusion.png"):
    assert os.path.getsize(os.path.join(report_dir, name)) > 0
  assert test["checkpoint"].endswith(f"best/{best['step']}")
  assert sorted(test["files"]) == sorted(os.path.join(report_dir, n) for n in (
      "test_results.json", "test_confusion.json", "test_confusion.png"))


def test_finetune_resumes_exactly(pretrained, tmp_path, finetune_config, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  overrides = dict(total_epochs=6, eval_every_epochs=2, **{"checkpoint.every_steps": 100})
  def loop(workdir, **hooks):
    return trainer.build(finetune_config(**overrides), str(tmp_path / workdir),
                         finetune.make_task, trainer.Hooks(**hooks))
  full = loop("a")
  full.run()
  full.close()
  # Validation was compiled before the first step, for the very arrays it met at each of its
  # three evaluations: one executable, never compiled again.
  compiles = [m for m in (r.getMessage() for r in caplog.records)
              if m.startswith("Compiled the eval step")]
  assert len(compiles) == 1 and compiles[0].startswith(
      "Compiled the eval step of config.evals.validation (ahead of the first step) in "), compiles
  assert len(full.evaluators["validation"].scorer.compiled) == 1
  first = loop("b", stop_after=10)
  first.run()
  first.close()
  assert first.checkpointer.all_steps() == [10]
  second = loop("b")
  second.run()
  second.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.final_state),
               jax.device_get(second.final_state))
  a, b = (json.load(open(tmp_path / d / finetune.BEST_FILE)) for d in ("a", "b"))
  assert a == b


def test_wrong_class_count_in_config_is_named(pretrained, tmp_path, finetune_config):
  config = finetune_config(num_classes=7)
  with pytest.raises(ValueError, match="has 7 classes but .* has 8"):
    trainer.build(config, str(tmp_path), finetune.make_task)


def test_preempted_fine_tuning_skips_the_final_evaluation(pretrained, tmp_path, monkeypatch, finetune_config):
  """SIGTERM (here: the preemption flag) saves, then nothing after training runs: no test
  report, and the caller sees errors.Preempted (exit 75 from the command line)."""
  from uniemox_jax import errors
  from uniemox_jax import trainer as trainer_lib
  config = finetune_config()
  monkeypatch.setattr(trainer_lib.StopSignals, "reached",
                      lambda self, step: trainer_lib.StopSignals.PREEMPTED if step == 3 else 0)
  with pytest.raises(errors.Preempted, match="preempted at step 3; rerun the same command"):
    finetune.finetune(config, str(tmp_path))
  assert os.path.isdir(tmp_path / "checkpoints" / "3")
  assert not list(tmp_path.glob("evaluations/best-*"))      # no test report


def test_a_checkpoint_with_reordered_classes_is_refused_before_the_first_step(
    finetuned, pretrained, tmp_path, finetune_config):
  """Same class names in another order would silently relabel every class."""
  from uniemox_jax import errors
  workdir, config, _ = finetuned
  data = str(tmp_path / "data")
  shutil.copytree(config.data.dir, data)
  info_path = os.path.join(data, "uniemox_info.json")
  info = json.load(open(info_path))
  info["class_names"] = info["class_names"][::-1]
  json.dump(info, open(info_path, "w"))
  other = finetune_config(**{
      "data.dir": data, "init.checkpoint": os.path.join(workdir, "best"), "init.encoder": ""})
  with pytest.raises(errors.UserError, match="was trained on classes"):
    trainer.build(other, str(tmp_path / "w"), finetune.make_task)   # among its first checks


def test_train_fraction_sets_the_schedule_and_is_recorded(pretrained, tmp_path,
                                                          finetune_config):
  full = trainer.build(finetune_config(), str(tmp_path / "full"), finetune.make_task)
  quarter = trainer.build(finetune_config(**{"data.train_fraction": 0.25}),
                          str(tmp_path / "quarter"), finetune.make_task)
  try:
    assert full.setup.subset is None and "train_subset" not in full.task.meta
    # 16 train images per class: 4 kept of each, an epoch a quarter as long.
    subset = quarter.task.meta["train_subset"]
    assert subset["records"] == 32 and subset["of"] == 128 and subset["seed"] == 0
    assert set(map(tuple, (v.values() for v in subset["per_class"].values()))) == {(4, 16)}
    assert quarter.setup.schedule.steps_per_epoch * 4 == full.setup.schedule.steps_per_epoch
  finally:
    full.close()
    quarter.close()

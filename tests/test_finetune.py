"""Downstream: layer-wise lr decay, exactly-once evaluation, fine-tuning from the demo encoder,
best-state selection and exact resume, the evaluation report and its errors, linear probe,
zero-shot and the prediction CLI."""
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from configs import demo_finetune
from configs import linear_probe as linear_probe_config
from data_pipelines import dataset_info
from data_pipelines import input_pipeline as ip
from data_pipelines import synthetic
from uniemox_jax import checkpointing
from uniemox_jax import evaluators
from uniemox_jax import finetune
from uniemox_jax import linear_probe
from uniemox_jax import models
from uniemox_jax import optim
from uniemox_jax import prediction
from uniemox_jax import pretrain
from uniemox_jax import runs
from uniemox_jax import sharding
from uniemox_jax import trainer
from uniemox_jax.evaluators import classification
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import linear_probe as probe_lib
from uniemox_jax.evaluators import reconstruction
from uniemox_jax.evaluators import reports
from uniemox_jax.evaluators import zero_shot
from uniemox_jax.tools import convert as convert_command
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- layer-wise learning-rate decay -------------------------------------------------------


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


# --- exactly-once evaluation --------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
  """A converted set whose test split has 13 records: divides neither 8 devices nor the
  eval batches below."""
  root = tmp_path_factory.mktemp("odd")
  synthetic.generate(str(root / "raw"), (2, 1, 2), 40, seed=1)
  test_files = sorted(p for p in (root / "raw" / "test").rglob("*.jpg"))
  for p in test_files[:3]:
    p.unlink()
  convert_command.main(["--source", "split_tree", "--root", str(root / "raw"), "--name", "odd",
                "--out", str(root / "shards"), "--workers", "1", "--no_progress",
                "--allow_empty_classes"])
  return str(root / "shards")


def _expected(data_dir, split, size):
  source = ip.ShardSource(data_dir, split)
  t = ip.EvalTransform(size)
  out = [t.map(source[i]) for i in range(len(source))]
  return (np.array([o["image"].astype(np.float64).sum() for o in out]),
          np.array([o["label"] for o in out]))


_SUMS = jax.jit(lambda b: {"sum": jnp.sum(b["image"].astype(jnp.float32), axis=(1, 2, 3))})


def test_exactly_once_on_eight_devices(odd_data):
  mesh = sharding.make_mesh(-1, 1)
  sums, labels = _expected(odd_data, "test", 32)
  assert len(sums) == 13
  for batch in (8, 24):
    ds = ip.eval_dataset(odd_data, "test", batch_size=batch, image_size=32)
    out = gathering.gather_split(_SUMS, ds, mesh, progress=False)
    np.testing.assert_allclose(out["sum"], sums, rtol=1e-6)
    np.testing.assert_array_equal(out["label"], labels)
  with pytest.raises(ValueError, match="config.eval_batch_size=12 must divide evenly"):
    gathering.check_batch(12, mesh)


_TWO_PROCESS = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
jax.distributed.initialize(sys.argv[2], 2, int(sys.argv[3]))
from data_pipelines import input_pipeline as ip
from uniemox_jax import sharding
from uniemox_jax.evaluators import gathering
mesh = sharding.make_mesh(-1, 1)
ds = ip.eval_dataset(sys.argv[1], "test", batch_size=12, image_size=32,
                     process_index=jax.process_index(), process_count=2)
fn = jax.jit(lambda b: {"sum": jnp.sum(b["image"].astype(jnp.float32), axis=(1, 2, 3))})
out = gathering.gather_split(fn, ds, mesh, progress=False)
print(json.dumps({"devices": len(jax.devices()), "sum": out["sum"].tolist(),
                  "label": out["label"].tolist()}))
"""



def test_exactly_once_on_two_processes(odd_data):
  port = environment.free_port()
  env = environment.subprocess_env(4)
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS, odd_data,
                             f"127.0.0.1:{port}", str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  sums, labels = _expected(odd_data, "test", 32)
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["devices"] == 8                 # 2 processes x 4 devices, one global batch
    np.testing.assert_allclose(got["sum"], sums, rtol=1e-6)
    assert got["label"] == labels.tolist()


# --- fine-tuning from the demo encoder ------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """The demo pretraining, shortened: a workdir with checkpoints/, synthetic/, tiny_clip/."""
  workdir = tmp_path_factory.mktemp("pretrained")
  config = demo.get_config()
  config.unlock()
  config.update_from_flattened_dict({"total_steps": 60, "data.synthetic_per_class": "16,4,4",
                                     "checkpoint.every_steps": 60, "log_every_steps": 5})
  pretrain.pretrain(config, str(workdir))
  return str(workdir)


def test_demo_pretraining_loss_falls(pretrained):
  logged = [json.loads(line) for line in open(os.path.join(pretrained, "metrics.jsonl"))]
  assert [m["step"] for m in logged] == list(range(5, 61, 5))
  for m in logged:
    assert {"l1", "l2", "l3", "total", "grad_norm", "learning_rate"} <= set(m)
  totals = [m["total"] for m in logged]
  assert np.mean(totals[-3:]) < 0.6 * totals[0], totals      # 3.12 -> 1.46 when written


def _finetune_config(pretrained, **overrides):
  config = demo_finetune.get_config(f"pretrained={pretrained}")
  config.unlock()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finetuned"))
  # Besides validation, a periodic evaluator of config.evals (the test split, every 20 steps).
  config = _finetune_config(pretrained, total_epochs=10, eval_every_epochs=2,
                            **{"evals.classification.period": 20})
  result = finetune.finetune(config, workdir)
  return workdir, config, result


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


def test_finetune_resumes_exactly(pretrained, tmp_path):
  overrides = dict(total_epochs=6, eval_every_epochs=2, **{"checkpoint.every_steps": 100})
  def loop(workdir, **hooks):
    return trainer.build(_finetune_config(pretrained, **overrides), str(tmp_path / workdir),
                         finetune.make_task, trainer.Hooks(**hooks))
  full = loop("a")
  full.run()
  full.close()
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


def test_evaluate_checkpoint_and_its_errors(finetuned, pretrained, tmp_path):
  workdir, config, _ = finetuned
  (result,) = evaluators.evaluate_checkpoint(config, os.path.join(workdir, "best"),
                                             ["classification"], split="val",
                                             out_dir=str(tmp_path), progress=False).values()
  assert result["num_examples"] == 32 and sum(map(sum, result["confusion_matrix"])) == 32
  assert any(f.endswith("/val_results.json") for f in result["files"])
  with pytest.raises(ValueError, match=r"--split: the split 'nosuch' is not in .*\(it has"):
    evaluators.evaluate_checkpoint(config, os.path.join(workdir, "best"), ["classification"],
                                   split="nosuch", out_dir=str(tmp_path))
  ckpt = checkpointing.Checkpoint.open(os.path.join(workdir, "best"))
  info = dataset_info.DatasetInfo.load(config.data.dir)
  with pytest.raises(ValueError, match="the head predicts 8 classes but the dataset"):
    classification.check_classes(ckpt, dataclasses.replace(info,
                                                            class_names=info.class_names[:7]))
  with pytest.raises(ValueError, match="was trained on classes"):
    classification.check_classes(ckpt, dataclasses.replace(info,
                                                           class_names=info.class_names[::-1]))
  with pytest.raises(ValueError, match="no classification head"):
    classification.check_classes(
        checkpointing.Checkpoint.open(os.path.join(pretrained, "checkpoints")), info)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluators.evaluate_checkpoint(config, str(tmp_path / "missing"), ["classification"])
  other = _finetune_config(pretrained, **{"model.pos_embed": "sincos"})
  with pytest.raises(ValueError, match="does not fit the model:\n  unexpected "
                                       "encoder/pos_embed"):
    evaluators.evaluate_checkpoint(other, os.path.join(workdir, "best"), ["classification"],
                                   split="val", out_dir=str(tmp_path))
  with pytest.raises(ValueError, match="not a UniEmoX pretraining checkpoint"):
    evaluators.evaluate_checkpoint(demo.get_config(), os.path.join(workdir, "best"),
                                   ["zero_shot"], data=config.data.dir)


def test_wrong_class_count_in_config_is_named(pretrained, tmp_path):
  config = _finetune_config(pretrained, num_classes=7)
  with pytest.raises(ValueError, match="has 7 classes but .* has 8"):
    trainer.build(config, str(tmp_path), finetune.make_task)


# --- linear probe, zero-shot, prediction ---------------------------------------------------


def test_linear_probe_end_to_end(pretrained, tmp_path):
  config = linear_probe_config.get_config(f"demo=True,pretrained={pretrained}")
  config.probe.steps = 200
  result = linear_probe.linear_probe(config, str(tmp_path))
  assert result["test"]["num_examples"] == 32
  assert result["best_weight_decay"] in config.probe.weight_decays
  assert result["test"]["top1"] > 1 / 8
  assert os.path.exists(tmp_path / "linear_probe" / "test_results.json")
  # The command's closing "wrote:" line lists what the task wrote, nothing it did not.
  assert runs.written(str(tmp_path)) == ["linear_probe/"]


def test_demo_pretraining_logs_its_evaluators(pretrained, tmp_path):
  """The demo config evaluates zero-shot, a linear probe and a reconstruction grid during
  pretraining (here at its last step, 60): scalars in metrics.jsonl and TensorBoard, the grid
  as a TensorBoard image, the reports beside the step; the evaluation command on the same
  checkpoint gives the same numbers."""
  from tensorboard.backend.event_processing import event_accumulator
  logged = [json.loads(line) for line in open(os.path.join(pretrained, "metrics.jsonl"))]
  assert [m["step"] for m in logged] == sorted({m["step"] for m in logged})   # a line a step
  last = logged[-1]
  assert last["step"] == 60 and "total" in last
  for key in ("zero_shot/top1", "zero_shot/macro_f1", "linear_probe/top1",
              "reconstruction/pixel_error"):
    assert key in last, sorted(last)
  assert 0 <= last["zero_shot/top1"] <= 1 and last["linear_probe/top1"] > 1 / 8
  assert 0 < last["reconstruction/pixel_error"] < 255
  events = event_accumulator.EventAccumulator(pretrained, size_guidance={"tensors": 0})
  events.Reload()
  # TF2 summaries are tensors, each tagged with its TensorBoard plugin.
  assert "reconstruction/reconstruction" in events.PluginTagToContent("images")
  assert "zero_shot/top1" in events.PluginTagToContent("scalars")
  (image,) = events.Tensors("reconstruction/reconstruction")
  assert image.step == 60
  out = os.path.join(pretrained, "evaluations", "checkpoints-60")
  for path in ("zero_shot/test_results.json", "linear_probe/test_results.json",
               "reconstruction/reconstruction_test.png"):
    assert os.path.getsize(os.path.join(out, path)) > 0, path
  # The one evaluation command, any evaluator, on the checkpoint of that step.
  results = evaluators.evaluate_checkpoint(
      demo.get_config(), os.path.join(pretrained, "checkpoints"), out_dir=str(tmp_path),
      progress=False)
  assert set(results) == {"zero_shot", "linear_probe", "reconstruction"}
  for name, result in results.items():
    for key, value in result["scalars"].items():
      assert value == pytest.approx(last[f"{name}/{key}"], abs=1e-6), (name, key)
  zs = results["zero_shot"]
  assert zs["num_examples"] == 32 and sum(map(sum, zs["confusion_matrix"])) == 32
  assert any(re.fullmatch(rf"{tmp_path}/zero_shot-synthetic-test-[0-9a-f]{{8}}/"
                          r"test_confusion\.png", f) for f in zs["files"]), zs["files"]


def test_the_evaluation_command_never_writes_over_a_run_or_another_evaluation(
    pretrained, odd_data):
  """The same checkpoint evaluated on two datasets after training: two folders, each with
  the settings it stands for, and the training run's own reports untouched."""
  run_report = os.path.join(pretrained, "evaluations", "checkpoints-60", "zero_shot",
                            "test_results.json")
  before = open(run_report, "rb").read()
  checkpoint = os.path.join(pretrained, "checkpoints")
  files = {}
  for data in ("", odd_data):        # the run's own data, then another dataset
    result = evaluators.evaluate_checkpoint(demo.get_config(), checkpoint, ["zero_shot"],
                                            data=data, progress=False)["zero_shot"]
    (files[data],) = [f for f in result["files"] if f.endswith("test_results.json")]
    assert json.load(open(files[data]))["num_examples"] == result["num_examples"]
    settings = json.load(open(os.path.join(os.path.dirname(files[data]), "settings.json")))
    assert settings["data"] == os.path.abspath(data or os.path.join(pretrained, "synthetic"))
  assert len({os.path.dirname(f) for f in files.values()}) == 2
  assert all(os.path.dirname(os.path.dirname(f)) == os.path.dirname(os.path.dirname(run_report))
             for f in files.values())      # beside the run's reports of that step
  assert open(run_report, "rb").read() == before


def test_evaluator_configs_are_checked_before_anything_runs(pretrained, tmp_path):
  from uniemox_jax import evaluators
  from uniemox_jax import errors
  mesh = sharding.make_mesh(-1, 1)
  # A folder the command's --data named is reported as --data, not as a config field.
  with pytest.raises(FileNotFoundError, match=rf"^--data {tmp_path}/none does not exist"):
    evaluators.evaluate_checkpoint(demo.get_config(), os.path.join(pretrained, "checkpoints"),
                                   ["zero_shot"], data=str(tmp_path / "none"), progress=False)

  def build(**evals):
    config = demo.get_config()
    config.evals = evals
    return evaluators.build(config, pretrained, mesh, reads=evaluators.base.PRETRAIN)
  with pytest.raises(errors.UserError, match=r"config.evals.x.type='knn': choose one of"):
    build(x={"type": "knn"})
  with pytest.raises(errors.UserError, match=r"config.evals.x: unknown fields \['splt'\]"):
    build(x={"type": "zero_shot", "splt": "val"})
  with pytest.raises(errors.UserError, match=r"config.evals.x: the split 'dev' is not in"):
    build(x={"type": "linear_probe", "train_split": "dev"})
  with pytest.raises(FileNotFoundError, match=r"^config.evals.x.data .*missing does not exist"):
    build(x={"type": "zero_shot", "data": str(tmp_path / "missing")})
  with pytest.raises(errors.UserError, match=r"type classification scores a classifier model; "
                                             r"this run trains a pretrain model"):
    build(x={"type": "classification"})
  config = demo.get_config()
  config.model.loss_weights.l3 = 0.0
  with pytest.raises(errors.UserError, match=r"config.model.loss_weights.l3 is 0"):
    evaluators.build(config, pretrained, mesh, ["reconstruction"])
  with pytest.raises(errors.UserError, match=r"--evals knn: not in config.evals"):
    evaluators.build(demo.get_config(), pretrained, mesh, ["knn"])
  # A type of one's own joins the registry.
  class Constant(evaluators.Evaluator):
    def run(self, params):
      return evaluators.Result({"one": 1.0}, {})
  evaluators.register("constant", Constant)
  try:
    config = demo.get_config()
    config.evals = {"c": {"type": "constant", "period": 5}}
    (c,) = evaluators.build(config, pretrained, mesh).values()
    assert [s for s in range(1, 13) if c.due(s, 12)] == [5, 10, 12]
    assert c.run(None).scalars == {"one": 1.0}
  finally:
    del evaluators.REGISTRY["constant"]


def test_reconstruction_grid_of_a_checkpoint(pretrained, tmp_path):
  from PIL import Image
  config = demo.get_config()
  data, size = os.path.join(pretrained, "synthetic"), config.model.image_size
  ckpt = checkpointing.Checkpoint.open(os.path.join(pretrained, "checkpoints"))
  step_dir = ckpt.step_dir
  model = models.pretrain_model(config.model)
  images = reconstruction.fixed_images(data, "test", 3, size)
  panels = reconstruction.reconstruct(model, ckpt.read(),
                                      images["image"], images["person"])
  removed, orig = panels["removed"], images["image"].astype(int)
  assert removed.shape == (3, size, size) and 0.7 <= removed.mean() <= 0.8   # mask ratio 0.75
  # Visible pixels come back as given (up to the rounding of normalize / denormalize); the
  # masked view is grey where patches were removed.
  assert np.abs(panels["original"] - orig).max() <= 1
  assert np.abs(panels["reconstruction"][~removed] - orig[~removed]).max() <= 1
  assert (panels["masked"][removed] == reconstruction.GREY).all()
  # The trained decoder predicts the removed patches better than an untrained one.
  key, img = jax.random.key(1), jnp.zeros((2, size, size, 3))
  fresh = model.init({"params": key, "mask": key, "dropout": key}, img, img)["params"]
  untrained = reconstruction.reconstruct(model, fresh, images["image"], images["person"])
  err = lambda p: np.abs(p["reconstruction"][removed].astype(int) - orig[removed]).mean()  # noqa: E731
  assert err(panels) < err(untrained), (err(panels), err(untrained))
  # The evaluation command, for any checkpoint: the grid beside the checkpoint's evaluations.
  proc = subprocess.run([sys.executable, "-m", "uniemox_jax.evaluate", "--config",
                         "configs/demo.py", f"--checkpoint={step_dir}", f"--data={data}",
                         "--evals=reconstruction", "--config.evals.reconstruction.num=2"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = re.search(rf"wrote: ({re.escape(reports.out_dir(step_dir))}/"
                  r"reconstruction-\w+-test-[0-9a-f]{8}/reconstruction_test\.png)",
                  proc.stdout).group(1)
  assert "read_only" not in proc.stderr and "read only" not in proc.stderr   # logs like main
  assert np.asarray(Image.open(out)).shape == (2 * size + 2, 3 * size + 4, 3)


def test_class_embeddings_average_templates(tiny_teacher):
  emb = zero_shot.class_embeddings(tiny_teacher, ["awe", "fear"])
  assert emb.shape == (2, tiny_teacher.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  one = tiny_teacher.embed_texts([t.format("awe") for t in zero_shot.TEMPLATES])
  one = one / np.linalg.norm(one, axis=1, keepdims=True)
  mean = one.mean(0)
  np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)


def test_predict_folder_to_csv_and_json(finetuned, tmp_path):
  workdir, config, _ = finetuned
  images = tmp_path / "images"
  # The converter generated the raw tree inside the data folder.
  shutil.copytree(os.path.join(config.data.dir, "raw", "test"), images)
  (images / "broken.jpg").write_bytes(b"not an image")
  paths = prediction.list_images(str(images))
  result = prediction.predict(config, os.path.join(workdir, "best"), paths, top_k=3)
  assert len(result["rows"]) == len(paths) - 1
  assert [p for p, _ in result["unreadable"]] == [str(images / "broken.jpg")]
  first = result["rows"][0]["predictions"]
  assert len(first) == 3 and first[0]["probability"] >= first[1]["probability"]
  prediction.write(result, str(tmp_path / "p.csv"), str(images), 3)
  rows = list(csv.reader(open(tmp_path / "p.csv")))
  assert rows[0][:3] == ["path", "emotion_1", "prob_1"] and len(rows) == len(paths)
  prediction.write(result, str(tmp_path / "p.json"), str(images), 3)
  assert len(json.load(open(tmp_path / "p.json"))["predictions"]) == len(paths) - 1
  # The images' folder names are their true classes: most predictions match.
  hits = [r["predictions"][0]["emotion"] == os.path.basename(os.path.dirname(r["path"]))
          for r in result["rows"]]
  assert np.mean(hits) >= 2 / 8
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    prediction.list_images(str(tmp_path / "nope"))


def test_preempted_fine_tuning_skips_the_final_evaluation(pretrained, tmp_path, monkeypatch):
  """SIGTERM (here: the preemption flag) saves, then nothing after training runs: no test
  report, and the caller sees errors.Preempted (exit 75 from the command line)."""
  from uniemox_jax import errors
  from uniemox_jax import trainer as trainer_lib
  config = _finetune_config(pretrained)
  monkeypatch.setattr(trainer_lib.StopSignals, "reached",
                      lambda self, step: trainer_lib.StopSignals.PREEMPTED if step == 3 else 0)
  with pytest.raises(errors.Preempted, match="preempted at step 3; rerun the same command"):
    finetune.finetune(config, str(tmp_path))
  assert os.path.isdir(tmp_path / "checkpoints" / "3")
  assert not list(tmp_path.glob("evaluations/best-*"))      # no test report


def test_a_checkpoint_with_reordered_classes_is_refused_before_the_first_step(
    finetuned, pretrained, tmp_path):
  """Same class names in another order would silently relabel every class."""
  import shutil
  from uniemox_jax import errors
  workdir, config, _ = finetuned
  data = str(tmp_path / "data")
  shutil.copytree(config.data.dir, data)
  info_path = os.path.join(data, "uniemox_info.json")
  info = json.load(open(info_path))
  info["class_names"] = info["class_names"][::-1]
  json.dump(info, open(info_path, "w"))
  other = _finetune_config(pretrained, **{
      "data.dir": data, "init.checkpoint": os.path.join(workdir, "best"), "init.encoder": ""})
  with pytest.raises(errors.UserError, match="was trained on classes"):
    trainer.build(other, str(tmp_path / "w"), finetune.make_task)   # among its first checks


def test_linear_probe_pools_as_the_fine_tuning_head(odd_data):
  """The probe's features are the classifier's fc_norm output at initialization: a head of
  width D set to the identity makes the classifier's logits those features."""
  import flax.linen as nn
  config = linear_probe_config.get_config("demo=True")
  config.model.image_size = 32
  width = 64
  model = models.Classifier(num_classes=width, variant=config.model.variant, image_size=32,
                            pos_embed="sincos")
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  assert params["head"]["kernel"].shape == (width, width), "the variant's width changed"
  params["head"] = {"kernel": jnp.eye(width), "bias": jnp.zeros(width)}
  encoder = dict(params["encoder"], norm={"scale": jnp.full(width, 3.0),    # a final norm the
                                          "bias": jnp.ones(width)})         # probe must drop
  mesh = sharding.make_mesh(-1, 1)
  config.eval_batch_size = 8
  out = probe_lib.encoder_features(config, encoder, ["test"], mesh, odd_data,
                                   progress=False)["test"]
  images = np.stack([ip.EvalTransform(32).map(ip.ShardSource(odd_data, "test")[i])["image"]
                     for i in range(13)])
  from uniemox_jax import augment
  logits, _ = model.apply({"params": params}, augment.normalize(jnp.asarray(images)))
  np.testing.assert_allclose(out["features"], logits, rtol=1e-4, atol=1e-4)

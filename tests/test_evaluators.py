"""The evaluation library (uniemox_jax/evaluators/): exactly-once gathering on any devices and
processes, the evaluators during a run and from the command on any checkpoint, their folders,
their checks, zero-shot prompts and the reconstruction grid."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from data_pipelines import dataset_info
from data_pipelines import input_pipeline as ip
from uniemox_jax import checkpointing
from uniemox_jax import evaluators
from uniemox_jax import models
from uniemox_jax import sharding
from uniemox_jax.evaluators import classification
from uniemox_jax.evaluators import gathering
from uniemox_jax.evaluators import reconstruction
from uniemox_jax.evaluators import reports
from uniemox_jax.evaluators import zero_shot
from tests import environment


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_evaluate_checkpoint_and_its_errors(finetuned, pretrained, tmp_path, finetune_config):
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
  other = finetune_config(**{"model.pos_embed": "sincos"})
  with pytest.raises(ValueError, match="does not fit the model:\n  unexpected "
                                       "encoder/pos_embed"):
    evaluators.evaluate_checkpoint(other, os.path.join(workdir, "best"), ["classification"],
                                   split="val", out_dir=str(tmp_path))
  with pytest.raises(ValueError, match="not a UniEmoX pretraining checkpoint"):
    evaluators.evaluate_checkpoint(demo.get_config(), os.path.join(workdir, "best"),
                                   ["zero_shot"], data=config.data.dir)


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
  reconstruct = reconstruction.reconstructor(model)
  panels = reconstruct(ckpt.read(), images["image"], images["person"])
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
  untrained = reconstruct(fresh, images["image"], images["person"])
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
  # Cells of at least 112 px, enlarged by whole pixels (each source pixel a uniform block),
  # under the caption and the column titles.
  png = np.asarray(Image.open(out))
  cell = size * -(-112 // size)
  assert cell >= 112 and png.shape[1] == 3 * cell + 2 * 4 and png.shape[0] > 2 * cell
  body = png[-cell:, :cell].reshape(size, cell // size, size, cell // size, 3)
  assert (body == body[:, :1, :, :1]).all()
  heading = reconstruction.grid({k: panels[k][:1] for k in panels}, "mask ratio 0.75")
  assert heading.shape[0] > cell and (heading[:40] != 255).any()      # titles drawn


def test_class_embeddings_average_templates(tiny_teacher):
  emb = zero_shot.class_embeddings(tiny_teacher, ["awe", "fear"])
  assert emb.shape == (2, tiny_teacher.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  one = tiny_teacher.embed_texts([t.format("awe") for t in zero_shot.TEMPLATES])
  one = one / np.linalg.norm(one, axis=1, keepdims=True)
  mean = one.mean(0)
  np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)


def test_the_confusion_figure_shows_counts_and_row_shares_under_its_title(monkeypatch):
  shown = {}
  monkeypatch.setattr(reports, "save_figure", lambda fig, path: shown.update(fig=fig))
  matrix = np.array([[3, 1], [0, 4]])
  reports.plot_confusion(matrix, ["awe", "fear"], "unused.png",
                         title="emo8 test | /ckpt/best/150 (step 150)")
  fig = shown["fig"]
  assert fig._suptitle.get_text() == "emo8 test | /ckpt/best/150 (step 150)"
  counts, shares = fig.axes
  assert (counts.get_title(), shares.get_title()) == ("counts", "row-normalized")
  assert [t.get_text() for t in counts.texts] == ["3", "1", "0", "4"]
  assert [t.get_text() for t in shares.texts] == ["0.75", "0.25", "0.00", "1.00"]

"""Test setup: 8 fake CPU devices, strict rank promotion, no network for Hugging Face."""
import json
import os
import subprocess

# Must happen before JAX initializes its backends.
from tests import environment  # noqa: E402

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + environment.xla_flags(8)).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
# The tests' own trainers share the compilation cache with the processes they start.
jax.config.update("jax_compilation_cache_dir", environment.CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
  """A tiny random CLIP (Flax weights + BPE tokenizer) saved the way a hub checkpoint is."""
  from uniemox_jax.teacher import tiny
  return tiny.make_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")), embed_dim=64)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_clip_dir):
  from uniemox_jax.teacher.clip import ClipTeacher
  return ClipTeacher.load(tiny_clip_dir)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
  """The synthetic dataset, converted once: (raw split-tree folder, shards folder)."""
  from uniemox_jax.tools import convert
  root = tmp_path_factory.mktemp("synthetic")
  out = root / "shards"
  convert.main(["--source", "synthetic", "--name", "synthetic", "--out", str(out),
                "--root", str(root / "raw"), "--per_class", "6,2,2", "--image_size", "48",
                "--workers", "1", "--shard_size", "20", "--no_progress"])
  return str(root / "raw"), str(out)


@pytest.fixture(scope="session")
def odd_data(tmp_path_factory):
  """A converted set whose test split has 13 records: divides neither 8 devices nor the
  eval batches of the tests."""
  from data_pipelines import synthetic
  from uniemox_jax.tools import convert as convert_command
  root = tmp_path_factory.mktemp("odd")
  synthetic.generate(str(root / "raw"), (2, 1, 2), 40, seed=1)
  test_files = sorted(p for p in (root / "raw" / "test").rglob("*.jpg"))
  for p in test_files[:3]:
    p.unlink()
  convert_command.main(["--source", "split_tree", "--root", str(root / "raw"), "--name", "odd",
                        "--out", str(root / "shards"), "--workers", "1", "--no_progress",
                        "--allow_empty_classes"])
  return str(root / "shards")


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
  """The demo pretraining, shortened: a workdir with checkpoints/, synthetic/, tiny_clip/."""
  from configs import demo
  from uniemox_jax import pretrain
  workdir = tmp_path_factory.mktemp("pretrained")
  config = demo.get_config()
  config.unlock()
  config.update_from_flattened_dict({"total_steps": 60, "data.synthetic_per_class": "16,4,4",
                                     "checkpoint.every_steps": 60, "log_every_steps": 5})
  pretrain.pretrain(config, str(workdir))
  return str(workdir)


def _finetune_config(pretrained, **overrides):
  from configs import demo_finetune
  config = demo_finetune.get_config(f"pretrained={pretrained}")
  config.unlock()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="session")
def finetune_config(pretrained):
  """(**overrides) -> the demo's fine-tuning config of the `pretrained` encoder."""
  return lambda **overrides: _finetune_config(pretrained, **overrides)


@pytest.fixture(scope="session")
def finetuned(pretrained, tmp_path_factory):
  """A fine-tuning of `pretrained`: (workdir, config, result)."""
  from uniemox_jax import finetune
  workdir = str(tmp_path_factory.mktemp("finetuned"))
  # Besides validation, a periodic evaluator of config.evals (the test split, every 20 steps).
  config = _finetune_config(pretrained, total_epochs=10, eval_every_epochs=2,
                            **{"evals.classification.period": 20})
  result = finetune.finetune(config, workdir)
  return workdir, config, result


# The files that take longest (worker seconds on the 2-core dev machine), started first: each
# file runs on one xdist worker (--dist loadfile), and a long file started last leaves the
# other worker idle at the end. pytest.ini turns off xdist's own order (most tests first).
_LONGEST_FIRST = ("test_lifecycle.py", "test_trainer.py", "test_aot.py", "test_cloud_storage.py",
                  "test_finetune.py", "test_explanation.py", "test_suite.py", "test_main.py",
                  "test_teacher.py", "test_backbones.py", "test_benchmarks.py",
                  "test_attention.py", "test_evaluators.py", "test_uniemox.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable within a file


@pytest.fixture(scope="session")
def writer_fixtures(tmp_path_factory):
  """(folder, truth): datasets and label tables written by the real writers (`datasets`,
  pandas) in the environment `make test` builds, and what those libraries read back
  (tests/hf_writer.py)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  writer = os.environ.get("UNIEMOX_HF_WRITER",
                          os.path.join(root, ".venv", "hf-writer", "bin", "python"))
  if not os.path.exists(writer):
    pytest.fail(f"{writer} does not exist: `make test` builds the writer environment "
                "(.venv/hf-writer: datasets, pandas), or set UNIEMOX_HF_WRITER to a Python "
                "that has tests/hf_writer.requirements.txt")
  out = tmp_path_factory.mktemp("written")
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             HF_HOME=str(out / "hf_home"))
  env.pop("PYTHONPATH", None)
  proc = subprocess.run([writer, os.path.join(root, "tests", "hf_writer.py"), str(out)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "truth.json") as f:
    return out, json.load(f)

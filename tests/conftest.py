"""Test setup: 8 fake CPU devices, strict rank promotion, no network for Hugging Face."""
import os

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


# The files that take longest (worker seconds on the 2-core dev machine), started first: each
# file runs on one xdist worker (--dist loadfile), and a long file started last leaves the
# other worker idle at the end. pytest.ini turns off xdist's own order (most tests first).
_LONGEST_FIRST = ("test_trainer.py", "test_finetune.py", "test_cloud_storage.py",
                  "test_benchmarks.py", "test_lifecycle.py", "test_attention.py",
                  "test_datasets.py", "test_main.py", "test_teacher.py", "test_uniemox.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable within a file

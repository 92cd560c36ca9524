"""Data, checkpoints and logs in a bucket: every command run as a user runs it, with gs:// paths,
against a GCS-protocol server on 127.0.0.1 (tests/gcs_server.py) that this module starts and
stops. Converting into a bucket (and resuming it), reading shards through the per-host cache,
pretraining with data and workdir in the bucket, SIGKILL and a bitwise resume, evaluating the
checkpoint from the bucket, and the one-line errors of a missing bucket."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from data_pipelines import dataset_info
from tests import environment
from tests import gcs_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "uniemox-test"
# The tests' short pretraining (test_trainer's runs compile the same programs).
STEPS = environment.SHORT_RUN_STEPS
_OVERRIDES = [*environment.SHORT_RUN, "--config.checkpoint.every_steps=10",
              "--config.checkpoint.keep=10", "--config.log_every_steps=5",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  srv = gcs_server.GcsServer(str(tmp_path_factory.mktemp("gcs"))).start()
  srv.create_bucket(BUCKET)
  # This process reads the bucket too: the same settings, and fresh clients that see them.
  saved = {k: os.environ.get(k) for k in srv.env}
  os.environ.update(srv.env)
  import fsspec
  import gcsfs
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  gcsfs.GCSFileSystem.clear_instance_cache()
  yield srv
  srv.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  fsspec.config.conf.get("gcs", {}).pop("token", None)
  gcsfs.GCSFileSystem.clear_instance_cache()


def _env(server, cache, devices=8):
  return environment.subprocess_env(devices, **server.env, UNIEMOX_CACHE_DIR=str(cache),
                                    UNIEMOX_TEST_BATCH_HASHES="1")


def _run(server, cache, *cmd, check=True, timeout=900):
  proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=_env(server, cache),
                        capture_output=True, text=True, timeout=timeout)
  if check:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
  return proc


def _gs(*parts):
  return "gs://" + "/".join((BUCKET,) + parts)


@pytest.fixture(scope="module")
def bucket_data(server, tmp_path_factory):
  """The synthetic set converted straight into the bucket, with TFDS metadata."""
  cache = tmp_path_factory.mktemp("convert_cache")
  out = _gs("data", "synthetic")
  proc = _run(server, cache, "uniemox_jax.tools.convert", "--source", "synthetic", "--name",
              "synthetic", "--out", out, "--per_class", "6,2,2", "--image_size", "48",
              "--shard_size", "16", "--workers", "1", "--no_progress")
  assert "OK: every shard" in proc.stdout and f"wrote: {out}" in proc.stdout
  return out, cache


def test_storage_module_in_a_bucket(server):
  from data_pipelines import storage
  d = _gs("unit")
  storage.makedirs(d)
  storage.write_text(storage.join(d, "a.json"), '{"x": 1}')
  storage.write_bytes(storage.join(d, "sub", "b.bin"), b"\x00\x01")
  assert storage.exists(storage.join(d, "a.json")) and storage.isdir(d)
  assert storage.listdir(d) == ["a.json", "sub"]
  assert storage.glob(storage.join(d, "*.json")) == [storage.join(d, "a.json")]
  assert json.loads(storage.read_text(storage.join(d, "a.json"))) == {"x": 1}
  assert storage.getsize(storage.join(d, "sub", "b.bin")) == 2
  storage.write_text(storage.join(d, "log"), "1\n2\n")
  assert storage.read_text(storage.join(d, "log")) == "1\n2\n"
  storage.remove(storage.join(d, "log"))
  assert not storage.exists(storage.join(d, "log"))
  storage.rmtree(d)
  assert not storage.exists(storage.join(d, "a.json"))
  # A bucket that is not there: one clear error, naming it.
  with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
    storage.makedirs("gs://no-such-bucket/run")
  assert storage.absolute("gs://b/x/") == "gs://b/x"     # not <cwd>/gs:/b/x


def test_refused_request_names_the_path_and_the_credentials():
  # The emulator grants everything; a refusal is gcsfs's HttpError with GCS's 403 body.
  from gcsfs.retry import HttpError
  from data_pipelines import storage
  with pytest.raises(PermissionError, match=r"gs://b/x: access refused .*denied.*application "
                                            r"default credentials"):
    with storage._remote("gs://b/x"):  # pylint: disable=protected-access
      raise HttpError({"code": 403, "message": "denied"})


def test_converted_bucket_verifies_and_reads_through_the_cache(server, bucket_data, tmp_path,
                                                               monkeypatch):
  from data_pipelines import input_pipeline
  from data_pipelines import verify
  from data_pipelines import storage
  out, _ = bucket_data
  names = storage.listdir(out)
  assert {"uniemox_info.json", "conversion_report.json", "dataset_info.json",
          "features.json"} <= set(names)
  assert not [n for n in names if ".tmp" in n]
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  assert verify.verify(out).ok
  source = input_pipeline.ShardSource(out, "train")
  assert len(source) == 48
  first = source[0]
  # The shards were copied once into this host's cache; a second source reuses the copies.
  cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
  assert cached and all(str(p).startswith(str(tmp_path / "cache")) for p in cached)
  mtimes = [p.stat().st_mtime_ns for p in cached]
  again = input_pipeline.ShardSource(out, "train")
  assert again[0] == first
  assert [p.stat().st_mtime_ns for p in cached] == mtimes
  # A shard replaced in the bucket after conversion is refused by name, not read.
  info = dataset_info.DatasetInfo.load(out)
  shard = storage.join(out, info.splits["train"].shards[1].file)
  original = storage.open(shard, "rb").read()
  data = bytearray(original)
  data[50] ^= 1
  storage.write_bytes(shard, bytes(data))
  try:
    with pytest.raises(IOError, match=r"sha256 .* the dataset's info file says"):
      input_pipeline.ShardSource(out, "train")
    assert not verify.verify(out).ok
  finally:
    storage.write_bytes(shard, original)     # the module's other tests read this dataset


def test_convert_into_a_bucket_resumes_and_rewrites_damage(server, tmp_path):
  """A rerun keeps finished shards (checked against the bucket's CRC32C, no download),
  rewrites a damaged one and redoes one a killed run never finished."""
  from data_pipelines import storage
  out = _gs("data", "resume")
  args = ["uniemox_jax.tools.convert", "--source", "synthetic", "--name", "s", "--out", out,
          "--per_class", "6,2,2", "--image_size", "32", "--shard_size", "16", "--workers",
          "1", "--no_progress", "--no_tfds_metadata"]
  _run(server, tmp_path, *args)
  shards = sorted(p for p in storage.glob(storage.join(out, "s-train.tfrecord-*"))
                  if p[-1].isdigit())
  assert len(shards) == 3
  before = {p: storage.open(p, "rb").read() for p in shards}
  storage.remove(shards[0])                       # killed before its upload finished
  storage.remove(shards[0] + ".stats.json")
  damaged = bytearray(before[shards[2]])
  damaged[100] ^= 0x10
  storage.write_bytes(shards[2], bytes(damaged))  # changed after conversion
  proc = _run(server, tmp_path, *args)
  report = json.loads(storage.read_text(storage.join(out, "conversion_report.json")))
  assert report["resumed_shards"] == 5 - 2, proc.stdout
  assert report["rewritten_damaged_shards"] == [storage.basename(shards[2])]
  assert {p: storage.open(p, "rb").read() for p in shards} == before
  # Another dataset's folder is refused before anything is written.
  bad = _run(server, tmp_path, *[a if a != "s" else "other" for a in args], check=False)
  assert bad.returncode == 2 and "holds the dataset 's'" in bad.stderr


def test_missing_bucket_is_one_line(server, tmp_path):
  proc = _run(server, tmp_path, "uniemox_jax.main", "--config", "configs/demo.py:evals=False",
              "--workdir=gs://no-such-bucket/run", check=False, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: gs://no-such-bucket/run: the bucket 'no-such-bucket'"), last
  assert "Traceback" not in proc.stderr


def test_an_unreachable_storage_service_is_one_line_within_its_budget(server, tmp_path):
  """No route to the service (here: the emulator's address with nothing listening): one line
  naming the path, what was tried and what to check, after the connection budget
  (UNIEMOX_STORAGE_CONNECT_S) instead of gcsfs's retries (over 30 s per request)."""
  env = dict(_env(server, tmp_path), UNIEMOX_STORAGE_CONNECT_S="2",
             STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{environment.free_port()}")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "uniemox_jax.main", "--config",
                         "configs/demo.py:evals=False", "--workdir=gs://some-bucket/run"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  seconds = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and re.fullmatch(
      r"error: gs://some-bucket/run: cannot reach the storage service at 127\.0\.0\.1:\d+ "
      r"\(STORAGE_EMULATOR_HOST; \d+ connection attempts over 2 s, last: .*refused.*\); check "
      r".*UNIEMOX_STORAGE_CONNECT_S=SECONDS waits longer on a slow network", lines[0]), lines
  # Well under one gcsfs request's own retries (backoff sleeps of 1+2+4+8+16 s), whatever the
  # machine's speed.
  assert seconds < 31, seconds


def test_a_workdir_lock_in_a_bucket_has_one_owner(server, monkeypatch):
  """The lock object is created under GCS's ifGenerationMatch=0 precondition: of many writers
  racing for it exactly one wins; a live holder's lock is refused, a dead one's taken over."""
  import concurrent.futures
  from uniemox_jax import errors
  from data_pipelines import storage
  from uniemox_jax import workdir_lock
  path = _gs("locks", "race")
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    won = list(pool.map(lambda i: storage.create_exclusive(path, f"{i}".encode()), range(8)))
  assert won.count(True) == 1
  assert storage.read_text(path) == str(won.index(True))

  workdir = _gs("runs", "locked")
  first = workdir_lock.WorkdirLock(workdir)
  first.acquire()
  assert storage.exists(storage.join(workdir, workdir_lock.LOCK_FILE))
  with pytest.raises(errors.UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
    workdir_lock.WorkdirLock(workdir).acquire()
  first.release()
  assert not storage.exists(storage.join(workdir, workdir_lock.LOCK_FILE))
  # A lock whose process has ended (on this host) is taken over.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  monkeypatch.setattr(workdir_lock.Holder, "this_process", classmethod(
      lambda cls: workdir_lock.Holder(host=socket.gethostname(), pid=int(dead.stdout),
                                      started="earlier", command="python -m uniemox_jax.main",
                                      boot_id=workdir_lock._boot_id())))
  workdir_lock.WorkdirLock(workdir).acquire()
  monkeypatch.undo()
  second = workdir_lock.WorkdirLock(workdir)
  second.acquire()
  assert json.loads(storage.read_text(storage.join(workdir, workdir_lock.LOCK_FILE)))[
      "pid"] == os.getpid()
  second.release()


# `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command CMD`: runs CMD here.
_FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls"
while [[ $# -gt 0 ]]; do
  if [[ $1 == --command ]]; then exec bash -c "$2"; fi
  shift
done
exit 3
"""


def _params(workdir, step):
  from uniemox_jax import checkpointing
  steps = checkpointing.finished_steps(workdir + "/checkpoints")
  assert step in steps, steps
  return checkpointing.Checkpoint.open(f"{workdir}/checkpoints/{step}").read(())


def _hashes(text):
  out = {}
  for line in text.splitlines():
    rec = json.loads(line)
    assert out.setdefault(rec["step"], rec["hash"]) == rec["hash"], rec
  return out


def test_pretrain_in_a_bucket_killed_resumes_bitwise_then_evaluates(server, bucket_data,
                                                                   tmp_path):
  """Data and workdir in the bucket: a run SIGKILLed after its first checkpoint resumes from
  the bucket (on a host with an empty cache) to the same bits as an uninterrupted run;
  zero-shot evaluation reads the checkpoint from the bucket."""
  from data_pipelines import storage
  data, _ = bucket_data
  config = [*_OVERRIDES, f"--config.data.dir={data}"]
  # The uninterrupted run, started as README's TPU section starts one: launch/tpu_pod.sh, here
  # with a gcloud that runs the worker command on this machine.
  reference = _gs("runs", "reference")
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "gcloud").write_text(_FAKE_GCLOUD)
  (fake_bin / "gcloud").chmod(0o755)
  (fake_bin / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (fake_bin / "python3").chmod(0o755)
  env = dict(_env(server, tmp_path / "c0"), REPO_DIR=ROOT,
             PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
  pod = subprocess.run(["bash", "launch/tpu_pod.sh", "fake-tpu", "fake-zone", config[1],
                        reference, *config[2:]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert pod.returncode == 0, pod.stderr[-4000:]
  assert "--worker=all" in (tmp_path / "bin" / "calls").read_text()
  workdir = _gs("runs", "killed")
  proc = subprocess.Popen([sys.executable, "-m", "uniemox_jax.main", *config,
                           f"--workdir={workdir}"], cwd=ROOT, env=_env(server, tmp_path / "c1"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not storage.exists(storage.join(workdir, "checkpoints", "10", "commit_success.txt")) \
      and not storage.exists(storage.join(workdir, "checkpoints", "20")):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert STEPS not in [int(s) for s in storage.listdir(storage.join(workdir, "checkpoints"))
                       if s.isdigit()]
  resumed = _run(server, tmp_path / "c2", "uniemox_jax.main", *config, f"--workdir={workdir}")
  assert "Resuming from" in resumed.stderr
  a, b = _params(workdir, STEPS), _params(reference, STEPS)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  hashes = _hashes(storage.read_text(storage.join(workdir, "batch_hashes.jsonl")))
  assert hashes == _hashes(storage.read_text(storage.join(reference, "batch_hashes.jsonl")))
  assert len(hashes) == STEPS
  # The logs a user looks at are in the bucket: config, one metrics line per logged step,
  # TensorBoard events.
  names = storage.listdir(workdir)
  assert "config.json" in names and any(n.startswith("events.out.tfevents") for n in names)
  logged = [json.loads(line)["step"] for line in
            storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()]
  assert logged == list(range(5, STEPS + 1, 5))
  # Zero-shot evaluation of the bucket's checkpoint, its report written beside it.
  zs = _run(server, tmp_path / "c3", "uniemox_jax.evaluate", "--config", "configs/demo.py",
            f"--checkpoint={workdir}/checkpoints", f"--data={data}", "--split=test",
            "--evals=zero_shot")
  assert f"wrote: {workdir}/evaluations/" in zs.stdout, zs.stdout[-2000:]
  reports = storage.glob(storage.join(workdir, "evaluations", "*", "zero_shot-*",
                                      "*_results.json"))
  assert reports, storage.listdir(workdir)
  assert "top1" in json.loads(storage.read_text(reports[0]))


def test_import_evaluate_predict_and_finetune_from_the_bucket(server, bucket_data, tmp_path):
  """A PyTorch .pth in the bucket is imported into a checkpoint in the bucket, which the
  evaluation and prediction commands read, and a fine-tuning run (workdir in the bucket)
  starts from, keeping its best state there and evaluating it at the end."""
  import functools
  import torch
  from timm.models.vision_transformer import VisionTransformer
  from data_pipelines import storage
  data, convert_cache = bucket_data
  names = list(dataset_info.DatasetInfo.load(data).class_names)
  model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                            mlp_ratio=2, qkv_bias=True, global_pool="avg", fc_norm=True,
                            num_classes=len(names),
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  torch.save({"model": model.state_dict()}, tmp_path / "emo.pth")
  src, imported = _gs("torch", "emo.pth"), _gs("imported", "emo")
  storage.upload(str(tmp_path / "emo.pth"), src)
  _run(server, tmp_path / "c0", "uniemox_jax.tools.import_torch", "--src", src, "--kind",
       "uniemox_finetune", "--image_size", "32", "--out", imported, "--class_names",
       ",".join(names))
  assert storage.exists(storage.join(imported, "0", "state"))
  # ... exported from the bucket into the bucket as a timm folder, which timm builds into the
  # model the .pth came from.
  exported = _gs("exported", "emo-timm")
  _run(server, tmp_path / "c4", "uniemox_jax.tools.export", f"--checkpoint={imported}",
       "--format=timm", f"--out={exported}")
  local = tmp_path / "emo-timm"
  local.mkdir()
  for name in ("config.json", "model.safetensors"):
    with storage.open(storage.join(exported, name), "rb") as f:
      (local / name).write_bytes(f.read())
  import timm
  again = timm.create_model(f"local-dir:{local}", pretrained=True).eval()
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    reference = model.eval()(x)
    assert reference.abs().max() > 1e-3 and (again(x) - reference).abs().max() < 1e-4

  ft = ["--config", "configs/demo_finetune.py", f"--config.data.dir={data}"]
  ev = _run(server, tmp_path / "c1", "uniemox_jax.evaluate", *ft, f"--checkpoint={imported}",
            "--split=test")
  (report,) = storage.glob(_gs("imported", "evaluations", "emo-0", "classification-*",
                               "test_results.json"))
  assert report in ev.stdout, ev.stdout[-2000:]
  assert json.loads(storage.read_text(report))["num_examples"] == 16

  images = os.path.join(convert_cache, "synthetic", "synthetic", "test")   # the raw test tree
  pr = _run(server, tmp_path / "c2", "uniemox_jax.predict", *ft[:2], f"--checkpoint={imported}",
            f"--images={images}", f"--out={_gs('predictions', 'emo.csv')}")
  rows = storage.read_text(_gs("predictions", "emo.csv")).splitlines()
  assert rows[0].startswith("path,emotion_1,prob_1") and len(rows) == 1 + 16, pr.stdout

  workdir = _gs("runs", "finetune")
  _run(server, tmp_path / "c3", "uniemox_jax.main", *ft, f"--workdir={workdir}",
       f"--config.init.encoder={imported}", "--config.total_epochs=2",
       "--config.eval_every_epochs=1", "--config.optim.warmup_epochs=1")
  best = json.loads(storage.read_text(storage.join(workdir, "best.json")))
  assert str(best["step"]) in storage.listdir(storage.join(workdir, "best"))
  result = json.loads(storage.read_text(storage.join(
      workdir, "evaluations", f"best-{best['step']}", "classification", "test_results.json")))
  assert result["num_examples"] == 16 and result["checkpoint"].startswith(workdir)

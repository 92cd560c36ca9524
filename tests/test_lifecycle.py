"""How runs end: several processes fail together, preemption exits with its own code and runs
nothing after training, a user's mistake is one line and exit 2, a bug keeps its traceback,
and the checks before the first step name what is wrong. Real processes, 127.0.0.1 only."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_pipelines import tfrecord
from uniemox_jax import errors
from uniemox_jax import trainer
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' short pretraining (test_trainer's two-process run compiles the same programs), on
# already-converted data; each process has 4 CPU devices.
_OVERRIDES = [*environment.SHORT_RUN, "--config.checkpoint.every_steps=5",
              "--config.log_every_steps=5", "--config.data.synthetic=False"]


def _env(devices=4, **extra):
  env = environment.subprocess_env(devices)
  env.pop(trainer.KILL_DURING_SAVE_ENV, None)
  env.pop(trainer.FAIL_BEFORE_STEP_ENV, None)
  env.update(extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main(workdir, data, *extra):
  return [sys.executable, "-m", "uniemox_jax.main", f"--workdir={workdir}", *_OVERRIDES,
          f"--config.data.dir={data}", *extra]


def _start_two(workdir, data, port, env=None, *extra):
  return [subprocess.Popen(
      _main(workdir, data, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}", *extra), cwd=ROOT, env=env or _env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout):
  """(return codes, stderrs, seconds until the last process ended)."""
  start = time.time()
  outs = [p.communicate(timeout=timeout) for p in procs]
  return [p.returncode for p in procs], [e for _, e in outs], time.time() - start


@pytest.fixture(scope="module")
def data(synthetic_data, tmp_path_factory):
  """A private copy of the converted synthetic set (tests damage it)."""
  out = str(tmp_path_factory.mktemp("data") / "shards")
  shutil.copytree(synthetic_data[1], out)
  return out


def test_a_corrupt_record_ends_every_process_with_its_message(data, tmp_path):
  damaged = str(tmp_path / "damaged")
  shutil.copytree(data, damaged)
  for name in os.listdir(damaged):      # every train record's payload, so one is read early
    if "-train.tfrecord" in name and name.endswith(tuple("0123456789")):
      path = os.path.join(damaged, name)
      offsets = tfrecord.read_index(path)
      blob = bytearray(open(path, "rb").read())
      for start in offsets[:-1]:
        blob[int(start) + 12 + 20] ^= 0xFF
      open(path, "wb").write(bytes(blob))
  procs = _start_two(str(tmp_path / "w"), damaged, _free_port())
  codes, errs, seconds = _finish(procs, timeout=240)
  assert all(c != 0 for c in codes), (codes, errs)
  assert errors.EXIT_USER_ERROR in codes
  failing = errs[codes.index(errors.EXIT_USER_ERROR)]
  assert re.search(r"error: .*CRC", failing), failing[-2000:]
  assert "Traceback" not in failing
  other = errs[1 - codes.index(errors.EXIT_USER_ERROR)]
  # The other process either read a corrupt record too, or was stopped with that message.
  assert "CRC" in other, other[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_killed_or_frozen_process_ends_the_other_within_60_seconds(data, tmp_path, sig):
  """SIGKILL: the peer's sockets close, and the survivor's collective fails at once. SIGSTOP (a
  host that hangs): its sockets stay open and only the missing heartbeats tell; the
  coordination service's timeout (distributed.HEARTBEAT_TIMEOUT_S) ends the survivor."""
  procs = _start_two(str(tmp_path / "w"), data, _free_port())
  # Mid-run: once step 5 is logged (each step is a collective of both), with 25 steps to go.
  environment.read_until(procs[0], rf"step 5/{environment.SHORT_RUN_STEPS}\b")
  procs[1].send_signal(sig)
  start = time.time()
  try:
    procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - start < 60
  finally:
    procs[1].kill()
    procs[1].communicate()


def test_an_error_before_the_first_step_ends_both_with_its_message(data, tmp_path):
  env = _env(**{trainer.FAIL_BEFORE_STEP_ENV: "1"})
  procs = _start_two(str(tmp_path / "w"), data, _free_port(), env)
  codes, errs, seconds = _finish(procs, timeout=240)
  assert codes[1] == 1 and "Traceback" in errs[1]     # a bug: traceback, exit 1
  assert "injected fault before the first step" in errs[1]
  assert codes[0] != 0
  assert "stopping: process 1: RuntimeError: injected fault" in errs[0], errs[0][-2000:]


_BARRIER = r"""
import sys, time
from uniemox_jax import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
if jax.process_index() == 0:
  time.sleep(float(sys.argv[3]))      # one-time work on process 0, longer than gloo's 30 s
distributed.barrier("setup done")
print("passed", jax.process_index(), flush=True)
"""


def test_long_one_time_work_on_one_process_does_not_trip_the_others(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", _BARRIER, address, str(i), "35"],
                            cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  time.sleep(3)
  # The coordinator listens on the address it was given, not on every interface.
  port = int(address.split(":")[1])
  bound = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    if os.path.exists(table):
      for line in open(table).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, p = local.split(":")
        if int(p, 16) == port and state == "0A":        # LISTEN
          bound.add(ip)
  # 127.0.0.1 only (as IPv4, or IPv4-mapped in the IPv6 table), not 0.0.0.0 or [::].
  assert bound and bound <= {"0100007F", "0000000000000000FFFF00000100007F"}, bound
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  assert all("passed" in o for o, _ in outs)


def _one(workdir, *extra, env=None, config="configs/demo.py:evals=False"):
  return subprocess.Popen([sys.executable, "-m", "uniemox_jax.main", "--config", config,
                           f"--workdir={workdir}", *extra], cwd=ROOT, env=env or _env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_user_error(proc, pattern):
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == errors.EXIT_USER_ERROR, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(pattern, last), last
  assert "Traceback" not in err
  return err


_MISTAKES = [
    (["--config.batch_sise=3"], r"--config\.batch_sise: no such config field; closest: "
                                r"batch_size"),
    (["--config.model.decoder.widht=3"], r"--config\.model\.decoder\.widht: no such config "
                                          r"field; closest: width"),
    (["--config.batch_size=abc"], r"--config\.batch_size=abc"),
    (["--bogus=1"], r"Unknown command line flag 'bogus'"),
    (["--config.data.dir=/nonexistent/emo8", "--config.data.synthetic=False"],
     r"/nonexistent/emo8"),
    (["--config.model.remat=sometimes"], r"config\.model\.remat='sometimes'"),
]


def test_user_mistakes_are_one_line_and_exit_2(tmp_path):
  # All at once: each is a process that stops before any training.
  procs = [(_one(str(tmp_path / str(i)), *extra), pattern)
           for i, (extra, pattern) in enumerate(_MISTAKES)]
  for proc, pattern in procs:
    _assert_user_error(proc, pattern)
  # UNIEMOX_TRACEBACK=1 adds the traceback to the same line.
  proc = _one(str(tmp_path / "tb"), "--config.batch_sise=3", env=_env(1, UNIEMOX_TRACEBACK="1"))
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == errors.EXIT_USER_ERROR and "Traceback" in err
  assert err.strip().splitlines()[-1].startswith("error: --config.batch_sise")


def test_missing_splits_are_named_before_the_first_step(
    data, tmp_path):
  # A data folder without the validation split that fine-tuning reads every epoch.
  no_val = str(tmp_path / "no_val")
  shutil.copytree(data, no_val)
  info = json.load(open(os.path.join(no_val, "uniemox_info.json")))
  del info["splits"]["val"]
  json.dump(info, open(os.path.join(no_val, "uniemox_info.json"), "w"))
  finetune = _one(str(tmp_path / "ft"), f"--config.data.dir={no_val}",
                  "--config.data.synthetic=False", config="configs/demo_finetune.py")
  pretrain = _one(str(tmp_path / "pt"), f"--config.data.dir={no_val}",
                  "--config.data.split=trian", "--config.data.synthetic=False")
  _assert_user_error(finetune, r"config\.data\.eval_split: the split 'val' is not in .*no_val "
                               r"\(it has test, train\)")
  _assert_user_error(pretrain, r"config\.data\.split: the split 'trian' is not in")

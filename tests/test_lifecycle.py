"""How runs end: several processes fail together, preemption exits with its own code and runs
nothing after training, a user's mistake is one line and exit 2, a bug keeps its traceback,
and the checks before the first step name what is wrong. Real processes, 127.0.0.1 only."""
import functools
import json
import os
import re
import shutil
import signal
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
  procs = _start_two(str(tmp_path / "w"), damaged, environment.free_port())
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
  procs = _start_two(str(tmp_path / "w"), data, environment.free_port())
  # Mid-run: once step 5 is logged (each step is a collective of both), with 25 steps to go.
  environment.read_until(procs[0], rf"step 5/{environment.SHORT_RUN_STEPS}\b")
  procs[1].send_signal(sig)
  start = time.time()
  try:
    procs[0].communicate(timeout=240)
    assert procs[0].returncode != 0
    # Our 30 s heartbeat timeout, not JAX's default 100 s, with room for a busy machine.
    assert time.time() - start < 90
  finally:
    procs[1].kill()
    procs[1].communicate()


def test_an_error_before_the_first_step_ends_both_with_its_message(data, tmp_path):
  env = _env(**{trainer.FAIL_BEFORE_STEP_ENV: "1"})
  procs = _start_two(str(tmp_path / "w"), data, environment.free_port(), env)
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
  address = f"127.0.0.1:{environment.free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", _BARRIER, address, str(i), "35"],
                            cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  # The coordinator listens on the address it was given, not on every interface.
  port = int(address.split(":")[1])

  def listening():
    bound = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
      if os.path.exists(table):
        for line in open(table).read().splitlines()[1:]:
          local, state = line.split()[1], line.split()[3]
          ip, p = local.split(":")
          if int(p, 16) == port and state == "0A":        # LISTEN
            bound.add(ip)
    return bound
  # Waits for the coordinator to come up (a busy machine takes its time), not a fixed while.
  bound = environment.wait_for(listening, f"the coordinator to listen on {address}")
  # 127.0.0.1 only (as IPv4, or IPv4-mapped in the IPv6 table), not 0.0.0.0 or [::].
  assert bound <= {"0100007F", "0000000000000000FFFF00000100007F"}, bound
  outs = [p.communicate(timeout=300) for p in procs]
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


def test_usage_mistakes_are_one_line_exit_2_and_name_what_was_typed(data, tmp_path):
  ckpt = str(tmp_path / "no_checkpoint")
  commands = [
      (["uniemox_jax.main", "--config", "configs/demo.py"],
       r"--workdir are required; see --help$"),
      (["uniemox_jax.predict", "--config", "configs/demo_finetune.py", "--checkpoint", ckpt,
        "--images", str(tmp_path), "--out", "predictions.xlsx"],
       r"--out predictions\.xlsx: write \.csv or \.json; see --help$"),
      # The folder came from --data, and the message says so (not config.evals....data).
      (["uniemox_jax.evaluate", "--config", "configs/demo.py", "--checkpoint",
        os.path.join(ROOT, "nonexistent"), "--data", str(tmp_path / "nodata")],
       r"checkpoint directory .*nonexistent does not exist \(--checkpoint\)"),
      (["data_pipelines.verify", str(tmp_path / "nodata")], None),
  ]
  procs = [subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env=_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for cmd, _ in commands]
  for proc, (cmd, pattern) in zip(procs, commands):
    out, err = proc.communicate(timeout=600)
    if pattern is None:           # verify reports a folder it was given as DIR, by its path
      assert proc.returncode == 1 and "nodata does not exist" in out, out
      assert "config.data.dir" not in out + err
      continue
    assert proc.returncode == errors.EXIT_USER_ERROR, (cmd, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), (cmd, err[-2000:])


def test_the_checks_before_the_first_step_report_every_problem_at_once(data, tmp_path):
  """Fine-tuning a 3-class dataset with a batch that does not divide over 8 devices: both
  problems in one run, one line each (before, the second showed only once the first was
  fixed)."""
  three = str(tmp_path / "three_classes")
  shutil.copytree(data, three)
  info = json.load(open(os.path.join(three, "uniemox_info.json")))
  info["class_names"] = info["class_names"][:3]
  json.dump(info, open(os.path.join(three, "uniemox_info.json"), "w"))
  proc = _one(str(tmp_path / "ft"), f"--config.data.dir={three}", "--config.batch_size=12",
              env=_env(8), config="configs/demo_finetune.py")
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == errors.EXIT_USER_ERROR and "Traceback" not in err, err[-3000:]
  problems = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(problems) == 2, err[-3000:]
  assert re.search(r"config\.batch_size=12 must divide evenly over 8 devices", problems[0])
  assert re.search(r"has 8 classes but .*three_classes has 3", problems[1])


# --- a run never loses work -------------------------------------------------------------------

def _single(workdir, data, *extra, cwd=ROOT, env=None):
  """One training process of the short run on 8 devices (test_trainer's programs, from the
  shared cache), its config given by absolute path so that it runs from any `cwd`; a process
  group of its own, like a command started from a terminal."""
  config = os.path.join(ROOT, environment.SHORT_RUN[1])
  return subprocess.Popen(
      [sys.executable, "-m", "uniemox_jax.main", "--config", config, f"--workdir={workdir}",
       *environment.SHORT_RUN[2:], "--config.checkpoint.every_steps=10",
       "--config.log_every_steps=1", f"--config.data.dir={data}",
       "--config.data.synthetic=False", *extra],
      cwd=cwd, env=env or _env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)


def _steps(workdir):
  return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _checkpoints(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_a_workdir_has_one_owner(data, tmp_path):
  """A second run on a workdir in use is refused in one line naming the first; the lock of a
  killed run on this host is taken over, saying so; one naming another host needs
  --force_unlock."""
  workdir = str(tmp_path / "w")
  first = _single(workdir, data)
  try:
    environment.read_until(first, r"Process 0 of 1")       # logged once the lock is held
    first.send_signal(signal.SIGSTOP)
    second = _single(workdir, data)
    _, err = second.communicate(timeout=600)
    assert second.returncode == errors.EXIT_USER_ERROR, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"error: the workdir is in use by another run \(pid {first.pid} on .*, started .*: "
        rf"python\S* -m uniemox_jax\.main .*--workdir={re.escape(workdir)} .*\); .*"
        rf"\(lock: {re.escape(workdir)}/workdir\.lock\)", lines[0]), lines
  finally:
    first.kill()
    first.communicate()
  third = _single(workdir, data)
  _, err = third.communicate(timeout=600)
  assert third.returncode == 0, err[-3000:]
  assert re.search(rf"Took over the workdir lock .*: left by a process that no longer runs "
                   rf"\(pid {first.pid} on ", err), err[-3000:]
  assert _steps(workdir) == list(range(1, environment.SHORT_RUN_STEPS + 1))
  assert not os.path.exists(os.path.join(workdir, "workdir.lock"))   # released at the end
  # A lock that names another host cannot be checked from here.
  with open(os.path.join(workdir, "workdir.lock"), "w") as f:
    json.dump({"host": "another-host", "pid": 4242, "started": "yesterday",
               "command": "python -m uniemox_jax.main ..."}, f)
  fourth = _single(workdir, data)
  _, err = fourth.communicate(timeout=600)
  assert fourth.returncode == errors.EXIT_USER_ERROR, err[-3000:]
  assert re.search(r"error: the workdir is locked by pid 4242 on another-host, .*cannot be "
                   r"checked from this host; if that run has ended, rerun with --force_unlock",
                   err), err[-3000:]
  fifth = _single(workdir, data, "--force_unlock")
  _, err = fifth.communicate(timeout=600)
  assert fifth.returncode == 0 and "Nothing to do" in err, err[-3000:]
  assert re.search(r"Took over the workdir lock .*: --force_unlock \(pid 4242 on another-host",
                   err)


def test_ctrl_c_saves_and_stops_from_any_directory(data, tmp_path):
  """A terminal's Ctrl-C (SIGINT to the whole process group, the input pipeline's workers
  included) saves and stops like a preemption, with exit 130; the same command resumes. The
  command runs from another directory, its config given by path."""
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  workdir = str(tmp_path / "w")
  run = functools.partial(_single, workdir, data, "--config.data.workers=2", cwd=elsewhere)
  proc = run()
  environment.read_until(proc, rf"step 12/{environment.SHORT_RUN_STEPS}\b")
  os.killpg(proc.pid, signal.SIGINT)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == errors.EXIT_INTERRUPTED, err[-3000:]
  assert "Traceback" not in err and "wrote:" not in out
  step = int(re.fullmatch(r"interrupted at step (\d+); rerun the same command to resume",
                          err.strip().splitlines()[-1]).group(1))
  assert 12 <= step < environment.SHORT_RUN_STEPS and step in _checkpoints(workdir)
  assert max(_steps(workdir)) == step          # every step it trained is logged and saved
  proc = run()
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert re.search(rf"Resuming from .*checkpoints/{step}\b", err)
  assert _steps(workdir) == list(range(1, environment.SHORT_RUN_STEPS + 1))
  assert not os.listdir(elsewhere)             # nothing written where the command started


_TWO_CTRL_C = r"""
import time
from uniemox_jax import cli
from uniemox_jax import trainer

def main(argv):
  stops = trainer.StopSignals()
  print("ready", flush=True)
  while not stops.requested:      # a first Ctrl-C only asks the loop to stop ...
    time.sleep(0.01)
  print("asked to stop", flush=True)
  while True:                     # ... which here never comes: a second one stops at once
    time.sleep(0.01)

cli.run(main)
"""


def test_a_second_ctrl_c_stops_at_once():
  proc = subprocess.Popen([sys.executable, "-c", _TWO_CTRL_C], cwd=ROOT, env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "ready\n"
  proc.send_signal(signal.SIGINT)
  assert proc.stdout.readline() == "asked to stop\n"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_INTERRUPTED
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == ("interrupted again: stopped at once, without saving; "
                                          "rerun the same command to resume from the last "
                                          "checkpoint")


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MB tmpfs: a real disk that a test can fill or make read-only (mounting needs root,
  as on the dev and CI machines)."""
  path = tmp_path / "disk"
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}")
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(disk, leave_kib):
  free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
  subprocess.run(["fallocate", "-l", str(free - leave_kib * 1024), os.path.join(disk, "filler")],
                 check=True)


def test_a_failed_save_stops_the_run_and_keeps_the_last_checkpoint(data, small_disk, tmp_path):
  """The disk fills up: the step-20 save fails; the run stops (within a step of the failure:
  test_trainer's test_a_failed_save_is_seen_at_the_next_step), in one line naming the
  checkpoint, the cause and the step kept, exit 2; nothing of the failed save is left; freed,
  the same command resumes from the kept step and finishes."""
  # Only the checkpoints on the small disk: the run's other writes (its log lines) cannot be
  # the first to find it full, whatever the timing.
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  os.makedirs(os.path.join(small_disk, "checkpoints"))
  os.symlink(os.path.join(small_disk, "checkpoints"), os.path.join(workdir, "checkpoints"))
  proc = _single(workdir, data)
  environment.read_until(proc, rf"step 12/{environment.SHORT_RUN_STEPS}\b")
  proc.send_signal(signal.SIGTERM)          # a checkpoint at step 10 and one where it stops
  proc.communicate(timeout=600)
  assert proc.returncode == errors.EXIT_PREEMPTED
  kept = max(_checkpoints(workdir))
  assert kept < 20
  _fill(small_disk, leave_kib=1024)         # a checkpoint takes about 2 MB
  proc = _single(workdir, data)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == errors.EXIT_USER_ERROR, err[-3000:]
  assert "Traceback" not in err
  assert [line for line in err.splitlines() if line.startswith("error: ")] == [
      f"error: could not save checkpoint 20 in {workdir}/checkpoints: No space left on device "
      f"(ENOSPC); the last good checkpoint, step {kept}, is kept; free space on that disk, or "
      "write elsewhere, then rerun the same command to resume"]
  # Stopped at the failure (how many steps ran until the slow save failed depends on the
  # machine; that it is noticed at the next step is test_trainer's test): nothing saved after
  # the kept step.
  assert max(_checkpoints(workdir)) == kept
  assert all(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
  os.remove(os.path.join(small_disk, "filler"))
  proc = _single(workdir, data)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert re.search(rf"Resuming from .*checkpoints/{kept}\b", err)
  assert max(_checkpoints(workdir)) == environment.SHORT_RUN_STEPS


def test_a_read_only_location_is_one_line_before_any_work(data, small_disk, tmp_path):
  workdir = os.path.join(small_disk, "w")
  out_dir = os.path.join(small_disk, "reports")
  os.makedirs(workdir)
  subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
  train = _single(workdir, data)
  evaluate = subprocess.Popen(
      [sys.executable, "-m", "uniemox_jax.evaluate", "--config", "configs/demo.py",
       "--checkpoint", str(tmp_path / "none"), "--evals", "zero_shot", f"--out_dir={out_dir}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for proc, path in ((train, f"{workdir}/workdir.lock"), (evaluate, out_dir)):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == errors.EXIT_USER_ERROR, err[-3000:]
    assert "Traceback" not in err
    assert (f"error: Read-only file system: {path} (the file system is read-only: write "
            "elsewhere)") in err.splitlines(), err[-3000:]
  # The evaluation command reports its other problem (no such checkpoint) in the same run.
  assert re.search(r"error: checkpoint directory .*none does not exist", err)

"""The pretraining trainer: exact resume after SIGKILL, SIGTERM and a killed save,
resharded restore, non-finite stop, and 2 processes agreeing with 1."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo
from uniemox_jax import checkpointing
from uniemox_jax import errors
from uniemox_jax import executables
from uniemox_jax import importers
from uniemox_jax import sharding
from uniemox_jax import trainer
from uniemox_jax import pretrain
from uniemox_jax.models import surgery
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = environment.SHORT_RUN_STEPS

# The tests' short run, with frequent checkpoints, recording each step's batch fingerprint.
_OVERRIDES = [*environment.SHORT_RUN, *environment.SYNTHETIC_DATA,
              "--config.checkpoint.every_steps=10", "--config.checkpoint.keep=20",
              "--config.log_every_steps=5"]


def _env(devices=8):
  # The runs share a compilation cache: the train step compiles once for the whole module.
  env = environment.subprocess_env(devices, **{trainer.BATCH_HASHES_ENV: "1"})
  env.pop(trainer.KILL_DURING_SAVE_ENV, None)
  return env


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "uniemox_jax.main", f"--workdir={workdir}", *_OVERRIDES, *extra]


def _run(workdir, *extra, env=None, check=True):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=env or _env(),
                        capture_output=True, text=True, timeout=900)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _hashes(workdir):
  """step -> batch fingerprint; a step run twice (before and after a restart) must agree."""
  out = {}
  for line in open(os.path.join(workdir, "batch_hashes.jsonl")):
    rec = json.loads(line)
    assert out.setdefault(rec["step"], rec["hash"]) == rec["hash"], rec
  return out


def _params(workdir, step=STEPS):
  directory = os.path.join(workdir, "checkpoints")
  steps = checkpointing.finished_steps(directory)
  assert step in steps, steps
  tree = checkpointing.Checkpoint.open(os.path.join(directory, str(step))).read(())
  return tree["params"], tree["opt_state"]


def _assert_bitwise_equal(a, b):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of STEPS steps on 8 devices (mesh data 2 x fsdp 4)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  _run(workdir)
  return workdir


def _start(workdir, env=None):
  return subprocess.Popen(_cmd(workdir), cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _checkpoints(workdir):
  return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    read_only=True).all_steps()


def test_interrupted_three_ways_resumes_bitwise(reference, tmp_path):
  """One workdir, interrupted three ways and restarted each time with the same command, ends
  bitwise equal to the uninterrupted reference, having trained on the same batches:
  1. SIGKILL while the checkpoint of step 20 is being written: that half-written checkpoint is
     never restored;
  2. SIGKILL at a random moment between log steps;
  3. SIGTERM (a preemption): it saves, exits 75 with "preempted at step N; rerun the same
     command to resume" as its last line, and runs nothing after training."""
  workdir = str(tmp_path)
  # 1. Killed mid-save.
  proc = _run(workdir, env=dict(_env(), **{trainer.KILL_DURING_SAVE_ENV: "20"}), check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert max(_checkpoints(workdir)) == 10          # the half-written 20 is not a checkpoint

  # 2. Killed at a random step, somewhere after step 15 was logged.
  proc = _start(workdir)
  log = environment.read_until(proc, r"step 15/30")
  assert re.search(r"Resuming from .*checkpoints/10\b", log), log[-3000:]
  # What the killed save left is removed at this start, saying so.
  assert re.search(r"Removed .*checkpoints/20\.orbax-checkpoint-tmp\S*: an unfinished "
                   r"checkpoint save", log), log[-3000:]
  time.sleep(random.uniform(0.0, 0.5))
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.kill()
  proc.communicate()

  # 3. Preempted at the first logged step after resuming.
  resumed_at = max(_checkpoints(workdir))
  proc = _start(workdir)
  environment.read_until(proc, rf"step {resumed_at + 5}/30")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]       # uniemox_jax.errors.EXIT_PREEMPTED
  step = int(re.fullmatch(r"preempted at step (\d+); rerun the same command to resume",
                          err.strip().splitlines()[-1]).group(1))
  assert resumed_at < step < STEPS and step in _checkpoints(workdir)
  assert "wrote:" not in out      # main's closing line: nothing after training ran

  # Finished by the same command.
  _run(workdir)
  _assert_bitwise_equal(_params(workdir), _params(reference))
  assert _hashes(workdir) == _hashes(reference) and len(_hashes(reference)) == STEPS
  # One metrics line per logged step (the preempted step is logged too), although steps after
  # each checkpoint were logged twice.
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == sorted(set(range(5, STEPS + 1, 5)) | {step}), steps


_RESTORE = r"""
import json, sys
import jax, numpy as np
from configs import demo
from uniemox_jax import pretrain, trainer
from uniemox_jax.models import surgery
config = demo.get_config("evals=False")
config.unlock()
config.update_from_flattened_dict({"total_steps": 30,
                                   "data.synthetic_per_class": "6,2,2",
                                   "data.synthetic_image_size": 48})
saved_scanned = config.model.scan
if sys.argv[2] == "other_layout":
  config.model.scan = not saved_scanned
t = trainer.build(config, sys.argv[1], pretrain.make_task)
state = t.checkpointer.restore(30, t.program.abstract_state)
live = jax.tree.leaves(state["params"])
back = surgery.to_layout(jax.device_get(state), scanned=saved_scanned)
sums = lambda tree: [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(tree)]
print(json.dumps({"devices": len(jax.devices()), "layout": surgery.layout(state["params"]),
                  "shards": max(len(x.sharding.device_set) for x in live),
                  "sums": sums(back["params"]), "opt_sums": sorted(sums(back["opt_state"]))}))
"""


@pytest.mark.parametrize("devices,layout", [(4, "same_layout"), (1, "same_layout"),
                                            (4, "other_layout")])
def test_restore_on_fewer_devices_and_into_the_other_block_layout(reference, devices, layout):
  """Restored on fewer devices, and into a model of the other layout (config.model.scan
  flipped: unrolled blocks stacked, or scanned ones unstacked, optimizer state too), the state
  is bitwise the saved one."""
  proc = subprocess.run([sys.executable, "-c", _RESTORE, reference, layout], cwd=ROOT,
                        env=_env(devices), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == devices and out["shards"] == devices
  saved_layout = surgery.layout(_params(reference)[0])
  assert (out["layout"] == saved_layout) == (layout == "same_layout"), out["layout"]
  params, opt_state = _params(reference)
  sums = lambda tree: [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(tree)]
  assert out["sums"] == sums(params)          # bitwise: same values, summed the same way
  assert out["opt_sums"] == sorted(sums(opt_state))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = demo.get_config("evals=False")
  config.unlock()
  config.update_from_flattened_dict({"total_steps": 40, "optim.base_lr": 1e30,
                                     "optim.warmup_steps": 0, "checkpoint.every_steps": 1,
                                     "checkpoint.keep": 100,
                                     "data.synthetic_per_class": "6,2,2"})
  t = trainer.build(config, str(tmp_path), pretrain.make_task)
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step (\d+)") as err:
    t.run()
  bad = int(err.value.args[0].split("step ")[1].split(":")[0])
  steps = t.checkpointer.all_steps()
  t.close()
  assert steps and max(steps) < bad



def test_two_processes_match_one(reference, tmp_path):
  workdir = str(tmp_path)
  port = environment.free_port()
  # With two of the demo's evaluators on (at the last step): zero-shot gathers its split over
  # both processes (as the linear probe's features do), the grid reads replicated outputs.
  evals = [f"--config.evals.{name}.period=100" for name in ("zero_shot", "reconstruction")]
  # One checkpoint, the last (the saves of steps 10 and 20 change no number compared here).
  procs = [subprocess.Popen(
      _cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}", "--config.checkpoint.every_steps=30", *evals), cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]

  def losses(w):
    return [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  two, one = losses(workdir), losses(reference)
  assert [m["step"] for m in two] == [m["step"] for m in one]
  for a, b in zip(two, one):
    for k in ("l1", "l2", "l3", "total"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6)
  assert {"zero_shot/top1", "reconstruction/pixel_error"} <= set(two[-1])
  out = os.path.join(workdir, "evaluations", f"checkpoints-{STEPS}")
  assert json.load(open(os.path.join(out, "zero_shot", "test_results.json")))[
      "num_examples"] == 16                  # every test image once (6,2,2 per class: 2 x 8)
  assert os.path.exists(os.path.join(out, "reconstruction", "reconstruction_test.png"))


def test_gradient_accumulation_averages_device_local_micro_batches(tmp_path, synthetic_data):
  _, data = synthetic_data
  config = demo.get_config("evals=False")
  config.unlock()
  config.update_from_flattened_dict({"optim.accum_steps": 2, "data.dir": data,
                                     "data.synthetic": False})
  t = trainer.build(config, str(tmp_path), pretrain.make_task)
  batch = jax.tree.map(np.asarray, t.task.dataset[0])
  batch = {k: batch[k] for k in ("scene", "person")}
  batch["text_emb"] = t.task.teacher.embed_texts(["The overall emotion conveyed is awe."] * 32)
  batch = {k: (v.astype(np.float32) / 255 if v.dtype == np.uint8 else v)
           for k, v in batch.items()}
  state = t.program.init(jax.random.key(0))
  teacher_params = sharding.host_to_global(t.task.teacher.params, t.program.replicated)
  key = jax.random.key(3)
  grads, terms = jax.jit(t.program.gradients)(state["params"], teacher_params, batch, key)
  # By hand: device d holds rows 4d..4d+3; micro-batch i takes rows 4d+2i, 4d+2i+1 of each.
  rows = [[4 * d + 2 * i + j for d in range(8) for j in range(2)] for i in range(2)]
  config.optim.accum_steps = 1
  single = jax.jit(t.program.gradients)   # traced afresh (it reads accum_steps), once for both
  parts = [single(state["params"], teacher_params, {k: v[r] for k, v in batch.items()},
                  jax.random.fold_in(key, i)) for i, r in enumerate(rows)]
  expect = jax.tree.map(lambda a, b: (a + b) / 2, parts[0], parts[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               (grads, terms), expect)
  t.close()


def test_resume_order_explicit_checkpoint_then_encoder_importer(reference, tmp_path):
  overrides = {"total_steps": STEPS, "data.synthetic_per_class": "6,2,2",
               "data.synthetic_image_size": 48, "mesh.fsdp": 4}

  def make(workdir, **init):
    config = demo.get_config("evals=False")
    config.unlock()
    config.update_from_flattened_dict(dict(overrides, **{f"init.{k}": v for k, v in
                                                         init.items()}))
    return trainer.build(config, str(workdir), pretrain.make_task)

  # An explicit checkpoint path (a step directory) when the workdir has none.
  t = make(tmp_path / "a", checkpoint=os.path.join(reference, "checkpoints", "10"))
  state = t.initial_state(None)
  assert int(state["step"]) == 10
  _assert_bitwise_equal(state["params"], _params(reference, 10)[0])
  t.close()
  # An encoder through a registered importer when there is no checkpoint at all.
  importers.register_encoder_importer(
      "test_plus_one", lambda path, template: jax.tree.map(lambda x: np.asarray(x) + 1.0,
                                                           template))
  t = make(tmp_path / "b", encoder="unused.file", encoder_format="test_plus_one")
  state = t.initial_state(None)
  fresh = t.program.init(jax.random.key(t.config.seed))
  assert int(state["step"]) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b) + 1.0, rtol=1e-6),
               state["params"]["encoder"], fresh["params"]["encoder"])
  _assert_bitwise_equal(state["params"]["decoder"], fresh["params"]["decoder"])
  t.close()
  t = make(tmp_path / "c", encoder="x", encoder_format="nope")
  with pytest.raises(ValueError, match="config.init.encoder_format='nope'"):
    t.initial_state(None)
  t.close()
  del importers.ENCODER_IMPORTERS["test_plus_one"]


def test_a_step_compiled_ahead_is_loaded_not_compiled(reference, tmp_path):
  """config.compiled_step: a step written out ahead (`executables.write`, which `tools.aot
  --write_step` does for a TPU slice) is loaded by the run instead of compiled, and trains
  bitwise as the compiled step; the file of another program is refused in one line."""
  workdir, path = str(tmp_path / "run"), str(tmp_path / "step.bin")

  def build(**fields):
    config = demo.get_config("evals=False")
    config.unlock()
    config.update_from_flattened_dict(dict({
        "total_steps": STEPS, "data.synthetic_per_class": "6,2,2",
        "data.synthetic_image_size": 48, "mesh.fsdp": 4}, **fields))
    return trainer.build(config, workdir, pretrain.make_task)
  loop = build()
  lowered = loop.program.step.lower(*loop.program.abstract_inputs())
  with executables.no_persistent_cache():
    executables.write(path, lowered.compile(), lowered, list(loop.mesh.devices.flat),
                      loop.program.compiler_options)
  loop.close()
  proc = _run(workdir, f"--config.compiled_step={path}")
  assert "Loaded the train step from " + path in proc.stderr, proc.stderr[-3000:]
  assert "Compiled the train step" not in proc.stderr
  _assert_bitwise_equal(_params(workdir), _params(reference))
  # Another learning rate is another program (a constant of it), though no shape changed.
  loop = build(compiled_step=path, **{"optim.base_lr": 0.5})
  with pytest.raises(errors.UserError) as refused:
    loop.compile_step(None, None, None)   # from shapes: a compiled step reads no arrays
  loop.close()
  assert str(refused.value).startswith(f"config.compiled_step={path} was compiled for another "
                                       "program (config, shapes"), str(refused.value)
  assert "\n" not in str(refused.value)


def test_host_stays_ahead_metrics_are_fetched_at_log_and_checkpoint_steps_only(
    tmp_path, synthetic_data, monkeypatch):
  """Each step is dispatched, then the next batch is read and placed before anything waits
  on the device; metrics come to the host only at log steps (one step late) and before a
  checkpoint is written; every loss is still checked."""
  _, data = synthetic_data
  config = demo.get_config("evals=False")
  config.unlock()
  config.update_from_flattened_dict({"total_steps": 12, "log_every_steps": 5,
                                     "checkpoint.every_steps": 8, "data.dir": data,
                                     "data.synthetic": False})
  events = []
  t = trainer.build(config, str(tmp_path), pretrain.make_task,
                    trainer.Hooks(trace=lambda *event: events.append(event[:2])))
  t.run()
  t.close()
  logged = [s for kind, s in events if kind == "log"]
  events = [e for e in events if e[0] != "log"]
  assert events[:4] == [("batch", 1), ("step", 1), ("batch", 2), ("step", 2)]
  # The batch of step s + 1 is placed right after step s is dispatched; only a checkpoint
  # step first checks its losses (the saved iterator position must be that of step s).
  for i, event in enumerate(events):
    if event[0] == "step" and event[1] < 12:
      following = events[i + 1:i + 3] if event[1] == 8 else events[i + 1:i + 2]
      assert following[-1] == ("batch", event[1] + 1), (event, following)
  # Fetches: log step 5 after step 6 is dispatched, checkpoint 8, log 10 one step late, the
  # final step 12.
  assert [e[1] for e in events if e[0] == "fetch"] == [5, 8, 10, 12]
  assert events.index(("fetch", 5)) > events.index(("step", 6))
  assert logged == [5, 10, 12]


def test_stop_signals_are_polled_every_n_steps_with_several_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  gathered = []
  monkeypatch.setattr(trainer.multihost_utils, "process_allgather",
                      lambda x: gathered.append(x) or np.stack([x, np.asarray(True)]))
  p = trainer.StopSignals(poll_every=10)
  try:
    answers = [p.reached(step) for step in range(1, 31)]
  finally:
    p.restore()
  assert p.polls == len(gathered) == 3
  assert [s for s, a in zip(range(1, 31), answers) if a] == [10, 20, 30]


def test_l1_group_device_reaches_the_objective(tmp_path):
  config = demo.get_config("evals=False")
  config.unlock()
  config.update_from_flattened_dict({"model.l1_group": "device", "optim.accum_steps": 2,
                                     "data.synthetic_per_class": "6,2,2", "total_steps": 1})
  t = trainer.build(config, str(tmp_path), pretrain.make_task)
  # 32 rows a step, 2 micro-batches of 16, 8 devices: groups of 2 rows.
  _, objective_fn, _ = t.task.loss.args
  assert objective_fn.l1_group_size == config.batch_size // 2 // 8
  t.close()


class _SlowFailingSaves:
  """Stands in for orbax's manager: every save stays in flight until `fail()` ends the first
  one with ENOSPC, as a full disk would, at a moment of the test's choosing."""

  def __init__(self, manager):
    self.manager, self.saving, self.error, self.saved = manager, False, None, []

  def save(self, step, args, force):
    del args, force
    self.saved.append(step)
    self.saving = True

  def fail(self):
    self.saving, self.error = False, OSError(errno.ENOSPC, "No space left on device")

  def is_saving_in_progress(self):
    return self.saving

  def wait_until_finished(self):
    self.saving = False
    if self.error is not None:
      error, self.error = self.error, None
      raise error

  def __getattr__(self, name):      # everything else (latest_step, close) is orbax's
    return getattr(self.manager, name)


def test_a_failed_save_is_seen_at_the_next_step(tmp_path, synthetic_data):
  """The asynchronous save of step 4 fails while step 6 runs: the run stops right after step
  6, naming step 4, however long the save took (whatever the machine's speed)."""
  _, data = synthetic_data
  config = demo.get_config("evals=False")
  config.unlock()
  config.update_from_flattened_dict({"total_steps": 12, "checkpoint.every_steps": 4,
                                     "data.dir": data, "data.synthetic": False})
  steps = []

  def trace(kind, step, *_):
    if kind == "step":
      steps.append(step)
      if step == 6:
        saves.fail()
  loop = trainer.build(config, str(tmp_path), pretrain.make_task, trainer.Hooks(trace=trace))
  saves = loop.checkpointer._manager = _SlowFailingSaves(loop.checkpointer._manager)
  with pytest.raises(checkpointing.SaveFailed, match=r"could not save checkpoint 4 in .*: No "
                                                     r"space left on device \(ENOSPC\)"):
    loop.run()
  loop.close()
  assert saves.saved == [4] and steps == [1, 2, 3, 4, 5, 6]

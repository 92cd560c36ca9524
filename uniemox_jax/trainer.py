"""The training loop that pretraining and fine-tuning share: one jitted, sharded step over a
device mesh, orbax checkpoints with exact resume, preemption, TensorBoard summaries.

`TrainLoop` holds the mesh, the optimizer, the sharded state, the checkpoints and the loop;
a task (`uniemox_jax.pretrain.PretrainTrainer`, `uniemox_jax.finetune.FinetuneTrainer`)
supplies the model, its data, its loss and what to do with a pretrained encoder.

Resume order (first that applies): the latest checkpoint in WORKDIR/checkpoints, then
`config.init.checkpoint` (an explicit path, state and data position), then
`config.init.encoder` (an encoder to start from, through an importer), then scratch.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any, Dict, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from data_pipelines import input_pipeline
from data_pipelines import storage
from uniemox_jax import checkpointing
from uniemox_jax import datasets
from uniemox_jax import distributed
from uniemox_jax import errors
from uniemox_jax import evaluate
from uniemox_jax import evaluators
from uniemox_jax import optim
from uniemox_jax import sharding
from uniemox_jax import summaries
from uniemox_jax.evaluators import base as evaluators_base

METRICS_FILE = "metrics.jsonl"

# Fault injection for tests: SIGKILL this process right after dispatching the save of this
# step, while the asynchronous write is still in flight.
KILL_DURING_SAVE_ENV = "UNIEMOX_FAULT_KILL_DURING_SAVE"
# Fault injection for tests: the process of this index raises (a bug) before the first step.
FAIL_BEFORE_STEP_ENV = "UNIEMOX_FAULT_FAIL_BEFORE_STEP"


class StopSignals:
  """SIGTERM (a preemption) or a first Ctrl-C (SIGINT) -> save and stop at the next step; a
  second Ctrl-C raises KeyboardInterrupt at once (the command line stops without saving).
  With several processes they agree on the step and the reason: every `poll_every` steps one
  all-gather of the flags (a collective every step would stall the host on the device), so a
  stop lands within `poll_every` steps."""
  NONE, PREEMPTED, INTERRUPTED = 0, 1, 2

  def __init__(self, poll_every: int = 10):
    self.requested = self.NONE
    self.poll_every = max(1, poll_every)
    self.polls = 0     # all-gathers made (tests count them)
    self._previous = {sig: signal.signal(sig, self._handler)
                      for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: will save a checkpoint and stop (Ctrl-C again: stop at once, "
                      "without saving)")
      signal.signal(signal.SIGINT, signal.default_int_handler)
      self.requested = max(self.requested, self.INTERRUPTED)
    else:
      logging.warning("SIGTERM received: will save a checkpoint and stop")
      self.requested = max(self.requested, self.PREEMPTED)

  def reached(self, step: int) -> int:
    """Why to stop after `step` (NONE: go on); the same answer on every process."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.poll_every:
      return self.NONE
    self.polls += 1
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return int(np.max(flags))

  def restore(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def batch_fingerprint(batch: Dict[str, np.ndarray]) -> str:
  h = hashlib.sha1()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]


class TrainLoop:
  """One training run. A task subclass provides:

    setup()                     -> sets self.model and self.dataset (after the mesh, the data
                                   info and the schedule exist)
    init_params(key)            -> the model's (logically boxed) parameters
    loss_fn(params, consts, batch, key) -> (loss, metrics); metrics[LOSS] is the loss
    constants()                 -> arrays every step reads but never trains (or None)
    batch_keys(host_batch)      -> the host batch's entries that go to the devices
    from_pretrained(state)      -> the fresh state with config.init.encoder loaded into it
  and may override lr_multipliers(params), after_step(step, state), checkpoint_meta().
  Every evaluator of config.evals (`uniemox_jax.evaluators`) runs on the parameters every
  `period` steps and at the last step; its scalars are logged as "<name>/<metric>", its images
  go to TensorBoard, its reports to WORKDIR/evaluations/checkpoints-<step>/<name>/.
  """
  LOSS = "total"
  reads = evaluators_base.PRETRAIN     # the parameters config.evals is given

  def __init__(self, config, workdir: str):
    # Everything here checks the user's inputs (config, data, teacher, checkpoints) before
    # any step runs: its ValueErrors and OSErrors are user errors (one line, exit 2).
    with errors.as_user_errors():
      self._prepare(config, workdir)

  def _prepare(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    # TensorBoard events and the JSON logs are written here, then pushed to the workdir.
    self.logs = storage.LocalMirror(workdir)
    self.history = []     # (step, metrics) of every logged step
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    num_devices, procs = self.mesh.devices.size, jax.process_count()
    accum = config.optim.get("accum_steps", 1)
    # The checks before the first step report every problem they find at once.
    checks = errors.Checks()
    with checks.check():
      if accum < 1 or config.batch_size % (num_devices * accum) or config.batch_size % procs:
        raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over "
                         f"{num_devices} devices x config.optim.accum_steps={accum} "
                         f"micro-batches and {procs} processes")
    self.local_batch = config.batch_size // procs
    self.info = None
    with checks.check():
      self.data_dir = datasets.resolve_data_dir(config, workdir)
      self.info = input_pipeline.load_info(self.data_dir, "config.data.dir")
    if self.info is None:    # nothing else can be checked without the data
      checks.raise_any()
    with checks.check():
      self.check_splits()
    with checks.check():
      self.check_data()
    with checks.check():
      self._check_restore_source()
    checks.raise_any()
    self.schedule = optim.resolve_schedule(
        config, datasets.num_examples(self.info, config.data.split))
    self.lr = optim.learning_rate(config, self.schedule)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.setup()
    # config.evals: built (data and splits checked) before any step.
    self.evaluators = evaluators.build(config, workdir, self.mesh, reads=self.reads,
                                       teacher=getattr(self, "teacher", None), training=True)
    self._build_state_fns()
    self.checkpointer = checkpointing.Checkpointer(
        storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
        asynchronous=config.checkpoint.asynchronous)

  def _check_restore_source(self) -> None:
    """The checkpoint a run will restore (the workdir's latest, else config.init.checkpoint)
    must fit its data (`check_checkpoint`)."""
    own = storage.join(self.workdir, "checkpoints")
    if storage.isdir(own):
      latest = checkpointing.latest_finished_step(own)
      if latest is not None:
        self.check_checkpoint(storage.join(own, str(latest)))
        return
    if self.config.init.checkpoint:
      self.check_checkpoint(checkpointing.resolve_step_dir(self.config.init.checkpoint,
                                                           "config.init.checkpoint"))

  # --- what a task provides ---------------------------------------------------------------

  def setup(self) -> None:
    raise NotImplementedError

  def required_splits(self) -> Dict[str, str]:
    """The splits the run reads, each with the config field that names it."""
    return {s: "config.data.split" for s in self.config.data.split.split("+")}

  def check_checkpoint(self, step_dir: str) -> None:
    """Fails, naming both, when a checkpoint to restore does not fit this run's data."""
    del step_dir

  def check_data(self) -> None:
    """Fails, naming the field, when the data does not fit the task (its classes)."""

  def check_splits(self) -> None:
    have = sorted(self.info["splits"])
    for split, field in self.required_splits().items():
      if split not in self.info["splits"]:
        raise errors.UserError(f"{field}: the split {split!r} is not in {self.data_dir} "
                               f"(it has {', '.join(have)})")

  def init_params(self, key):
    raise NotImplementedError

  def loss_fn(self, params, consts, batch, key):
    raise NotImplementedError

  def constants(self):
    return None

  def batch_keys(self, host_batch) -> list:
    raise NotImplementedError

  def from_pretrained(self, state):
    raise NotImplementedError

  def lr_multipliers(self, params):
    """Per-parameter learning-rate multipliers (a tree like `params`), or None."""
    del params
    return None

  def after_step(self, step: int, state) -> Dict[str, float]:
    """Runs after `step` (1-based) is dispatched, before its checkpoint; returns metrics to
    log (fine-tuning evaluates here)."""
    del step, state
    return {}

  def checkpoint_meta(self) -> Dict[str, Any]:
    return {"task": type(self).__name__}

  # --- state -----------------------------------------------------------------------------

  def _init_boxed(self, key):
    params = self.init_params(key)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def _build_state_fns(self):
    abstract_boxed_params = jax.eval_shape(self.init_params, jax.random.key(0))
    abstract_params = nn.unbox(abstract_boxed_params)
    self.tx = optim.make_optimizer(self.config, self.lr, self.lr_multipliers(abstract_params))
    # The state's abstract tree from the abstract parameters (one trace of the model, not two).
    abstract_boxed = jax.eval_shape(
        lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": self.tx.init(p)},
        abstract_boxed_params)
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_boxed), self.mesh, sharding.LOGICAL_RULES)
    self.abstract_state = checkpointing.abstract_with_shardings(
        nn.unbox(abstract_boxed), self.state_shardings)
    self._init = jax.jit(lambda k: nn.unbox(self._init_boxed(k)),
                         out_shardings=self.state_shardings)
    # The logical axis rules are in scope while the step is traced, so the models' activation
    # annotations become sharding constraints.
    self._step = jax.jit(sharding.with_rules(self._train_step, self.mesh),
                         in_shardings=(self.state_shardings, self.replicated,
                                       self.batch_sharding, self.replicated),
                         out_shardings=(self.state_shardings, self.replicated),
                         donate_argnums=(0,))

  def place_params(self, params):
    """Host parameters -> global arrays in the state's parameter shardings."""
    return sharding.host_to_global(params, self.state_shardings["params"])

  def initial_state(self, iterator):
    """The state to start from, following the documented resume order. What is restored is
    checked against this run first (`check_checkpoint`)."""
    cfg = self.config.init
    latest = self.checkpointer.latest_step()
    if latest is not None:      # checked against this run before the first step
      logging.info("Resuming from %s/%d", self.checkpointer.directory, latest)
      return self.checkpointer.restore(latest, self.abstract_state, iterator)
    if cfg.checkpoint:
      with errors.as_user_errors():
        ckpt, step = checkpointing.open_for_restore(cfg.checkpoint)
      logging.info("Starting from checkpoint %s/%d", ckpt.directory, step)
      state = ckpt.restore(step, self.abstract_state, iterator)
      ckpt.close()
      return state
    state = self._init(jax.random.key(self.config.seed))
    if cfg.encoder:
      with errors.as_user_errors():
        state = self.from_pretrained(state)
    return state

  # --- the step ---------------------------------------------------------------------------

  def _train_step(self, state, consts, batch, base_key):
    key = jax.random.fold_in(base_key, state["step"])
    grads, terms = self._gradients(state["params"], consts, batch, key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   update_norm=optax.tree.norm(updates),
                   learning_rate=self.lr(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def _gradients(self, params, consts, batch, key):
    """Gradients and metrics of one global batch, in `config.optim.accum_steps`
    micro-batches whose gradients are averaged (to bound activation memory). Each
    micro-batch takes the same rows of every device's shard, so no data moves between
    devices; batch-wide terms (pretraining's L1, mixup's partner) then span one micro-batch."""
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    accum = self.config.optim.get("accum_steps", 1)
    if accum == 1:
      (_, terms), grads = grad_fn(params, consts, batch, key)
      return grads, terms
    shards = self.mesh.devices.size

    def split(x):   # [B, ...] -> [accum, B / accum, ...], rows kept on their device
      x = x.reshape((shards, accum, x.shape[0] // (shards * accum)) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1).reshape((accum, x.shape[0] * x.shape[2]) + x.shape[3:])
    micro_batches = jax.tree.map(split, batch)

    def body(carry, inputs):
      i, micro = inputs
      (_, terms), grads = grad_fn(params, consts, micro, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (grads, terms)), None
    (_, terms_shape), grads_shape = jax.eval_shape(
        grad_fn, params, consts, jax.tree.map(lambda x: x[0], micro_batches), key)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, terms_shape))
    (grads, terms), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_batches))
    return jax.tree.map(lambda g: g / accum, (grads, terms))

  def to_global(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k])
            for k in self.batch_keys(batch)}

  # --- the loop ---------------------------------------------------------------------------

  def run(self, stop_after: Optional[int] = None) -> Dict[str, float]:
    """Trains to the schedule's last step, or (as a preemption would) saves and stops after
    step `stop_after`.

    The host stays ahead of the device: each step is dispatched, then the next batch is read
    and placed while it runs; metrics stay on the device until a log step (fetched one step
    late) or a checkpoint (every loss since the last fetch is checked finite before saving).
    """
    cfg = self.config
    iterator = input_pipeline.make_iterator(self.dataset, workers=cfg.data.workers)
    state = self.initial_state(iterator)
    start = int(jax.device_get(state["step"]))
    total = self.schedule.total_steps
    consts = self.constants()
    base_key = jax.random.key(cfg.seed + 1)
    # TensorBoard events from process 0; the log gets one progress line per log step.
    writer = summaries.SummaryWriter(self.logs.local) if jax.process_index() == 0 else \
        summaries.NullWriter()
    self._run_start = (time.perf_counter(), start, total)
    profile = summaries.ProfileWindow(self.logs.local, start + cfg.profile.first_step,
                                      cfg.profile.num_steps) \
        if jax.process_index() == 0 and cfg.profile.num_steps > 0 else None
    self._hashes = open(self.logs.pull("batch_hashes.jsonl"), "a") if \
        cfg.get("log_batch_hashes", False) else None
    stops = StopSignals(cfg.get("preemption_poll_steps", 10))
    kill_at = int(os.environ.get(KILL_DURING_SAVE_ENV, "-1"))
    self._window, self._last, self._pending = [], {}, {}
    self._clock = (time.perf_counter(), start)      # (time, step) of the last logged window
    log_due, stopped = None, None
    self._trim_metrics_log(start)
    if start >= total:
      logging.info("Nothing to do: %s already holds the final step %d", self.workdir, total)
    logging.info("Training steps %d..%d (%d per epoch), global batch %d on %s, peak lr %.3g "
                 "(base_lr %.3g x %d / 256)", start, total, self.schedule.steps_per_epoch,
                 cfg.batch_size, dict(self.mesh.shape), optim.peak_lr(cfg),
                 cfg.optim.base_lr, cfg.batch_size)
    if os.environ.get(FAIL_BEFORE_STEP_ENV) == str(jax.process_index()):
      raise RuntimeError(f"injected fault before the first step ({FAIL_BEFORE_STEP_ENV})")
    try:
      batch = self._next_batch(iterator, start + 1) if start < total else None
      train_step = self._step if batch is None else distributed.compile_together(
          self._step, state, consts, batch, base_key, name="train step")
      for step in range(start, total):
        state, metrics = train_step(state, consts, batch, base_key)
        self._window.append((step + 1, metrics))
        self.checkpointer.check()      # an asynchronous save's failure ends the run here
        if profile is not None:
          profile(step + 1, metrics)
        reason = stops.reached(step + 1) or (
            StopSignals.PREEMPTED if step + 1 == stop_after else StopSignals.NONE)
        preempted = reason != StopSignals.NONE
        done = step + 1 == total
        paused = time.perf_counter()
        extra = dict(self.after_step(step + 1, state))
        extra.update(self._evaluate(writer, step + 1, total, state["params"]))
        if extra:
          # One line per step: a step whose training metrics are logged carries these too.
          if (step + 1) % cfg.log_every_steps == 0 or preempted or done:
            self._pending[step + 1] = extra
          else:
            self._log(writer, step + 1, extra)
          self._clock = (self._clock[0] + time.perf_counter() - paused, self._clock[1])
        if preempted or done or (step + 1) % cfg.checkpoint.every_steps == 0:
          # Never checkpoint a non-finite step; the last step is always logged.
          self._fetch(writer, step + 1, final=preempted or done)
          # The iterator has given exactly the batches of steps 1..step+1: its state is the
          # one that resumes at step + 2.
          self.checkpointer.save(step + 1, state, iterator, meta=self.checkpoint_meta())
          if jax.process_index() == 0:
            self.logs.push(force=True)
          if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
          if preempted:
            self.checkpointer.wait()
            logging.warning("Saved step %d, stopping", step + 1)
            stopped = (step + 1, reason)
            break
        if not done:
          batch = self._next_batch(iterator, step + 2)
        if log_due is not None:     # one step late: step + 1 is already queued behind it
          self._fetch(writer, log_due)
          log_due = None
        if (step + 1) % cfg.log_every_steps == 0:
          log_due = step + 1
    except KeyboardInterrupt:
      raise               # a second Ctrl-C: stop at once, without waiting for anything
    except BaseException:
      # The run fails with its own error; a save still in flight ends as it can.
      try:
        self.checkpointer.wait()
      except checkpointing.SaveFailed as e:
        logging.error("%s", e)
      raise
    else:
      self.checkpointer.wait()
    finally:
      writer.close()
      if profile is not None:
        profile.close()
      stops.restore()
      if self._hashes is not None:
        self._hashes.close()
      if jax.process_index() == 0:
        self.logs.push(force=True)
      if hasattr(iterator, "close"):
        iterator.close()
    self.final_state = state
    if stopped is not None and stopped[0] != stop_after:
      # A real preemption or Ctrl-C: nothing after training (final evaluations) may run.
      raise (errors.Interrupted if stopped[1] == StopSignals.INTERRUPTED else
             errors.Preempted)(stopped[0])
    return self._last

  def _evaluate(self, writer, step: int, total: int, params) -> Dict[str, float]:
    """The evaluators due at `step`: their scalars (to log), images and reports."""
    scalars = {}
    for name, evaluator in self.evaluators.items():
      if not evaluator.due(step, total):
        continue
      result = evaluator.run(params)
      # Where the evaluation command puts the reports of checkpoints/<step>.
      evaluator.write(result, evaluate.default_out_dir(
          storage.join(self.checkpointer.directory, str(step))))
      scalars.update({f"{name}/{k}": v for k, v in result.scalars.items()})
      if result.images:
        writer.write_images(step, {f"{name}/{k}": v[None] for k, v in result.images.items()})
    return scalars

  def _next_batch(self, iterator, step: int) -> Dict[str, jax.Array]:
    """The batch of `step` (1-based), read from the pipeline and placed on the devices."""
    host_batch = next(iterator)
    if self._hashes is not None:
      self._hashes.write(json.dumps({"step": step, "hash": batch_fingerprint(host_batch)})
                         + "\n")
      self._hashes.flush()
    return self.to_global(host_batch)

  def _fetch(self, writer, upto: int, final: bool = False) -> None:
    """Brings the metrics of the dispatched steps up to `upto` to the host: every loss is
    checked finite; log steps (and the final one) are logged with the images/s since the
    previous log."""
    ready = [(s, m) for s, m in self._window if s <= upto]
    self._window = [(s, m) for s, m in self._window if s > upto]
    if not ready:
      return
    losses = jax.device_get([m[self.LOSS] for _, m in ready])
    for (s, m), loss in zip(ready, losses):
      if not np.isfinite(loss):
        self._check(s, m)          # raises, naming the step and every metric
    every = self.config.log_every_steps
    logged = {}
    for s, m in ready:
      if s % every == 0 or (final and s == ready[-1][0]):
        values = self._check(s, m)
        now, (since, since_step) = time.perf_counter(), self._clock
        values["images_per_sec"] = (s - since_step) * self.config.batch_size / max(
            now - since, 1e-9)
        self._clock = (now, s)
        values.update(self._pending.pop(s, {}))
        self._log(writer, s, values)
        logged[s] = values
    self._last = logged.get(ready[-1][0]) or self._check(*ready[-1])

  def _log(self, writer, step: int, values: Dict[str, float]) -> None:
    """TensorBoard, one JSON line per log step and a progress line (process 0)."""
    self.history.append((step, values))
    writer.write_scalars(step, values)
    if jax.process_index() == 0:
      path = self.logs.path(METRICS_FILE)
      with storage.naming(path), open(path, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
      self.logs.push()
      logging.info("%s", self._progress_line(step, values))

  def _progress_line(self, step: int, values: Dict[str, float]) -> str:
    """"step 50/300 (17%)  total 0.812  l1 0.21 ...  1234 img/s  2m10s left"."""
    since, first, total = self._run_start
    elapsed = time.perf_counter() - since
    done = step - first
    left = (total - step) * elapsed / done if done > 0 else float("nan")
    shown = [f"{k} {v:.4g}" for k, v in values.items()
             if k not in ("images_per_sec", "learning_rate") and not k.endswith("_norm")]
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)", "  ".join(shown)]
    if "images_per_sec" in values:
      parts.append(f"{values['images_per_sec']:.0f} img/s")
    if np.isfinite(left):
      parts.append(f"{_duration(left)} left")
    return "  ".join(p for p in parts if p)

  def _trim_metrics_log(self, start: int) -> None:
    """A resumed run logs again the steps after its checkpoint: drop their old lines, so the
    file keeps one line per step."""
    if jax.process_index() != 0:
      return
    path = self.logs.pull(METRICS_FILE)
    if not os.path.exists(path):
      return
    with open(path) as f:
      lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= start]
    if len(keep) != len(lines):
      storage.write_text(path, "".join(keep))

  def _check(self, step: int, metrics) -> Dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values[self.LOSS]):
      raise FloatingPointError(
          f"non-finite loss at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in
                                                        sorted(values.items()))
          + "; the last checkpoint before it is kept")
    return values

  def close(self) -> None:
    self.checkpointer.close()


def train(trainer: TrainLoop) -> Dict[str, float]:
  try:
    return trainer.run()
  finally:
    trainer.close()

"""The training loop every task shares: one jitted, sharded step over a device mesh, orbax
checkpoints with exact resume, evaluators, preemption and Ctrl-C, TensorBoard summaries.

  result = trainer.train(config, workdir, pretrain.make_task)

Read top to bottom: `Setup` (before the first step: the mesh, the data, the schedule; every
problem found at once), `Task` (what a task adds: a record of functions and its data, built by
`pretrain.make_task` or `finetune.make_task`), `train` and `TrainLoop` (restore or initialize,
compile, the steps, the end), then the parts the loop is made of: `StepProgram` (the jitted
step, from shapes alone: what `uniemox_jax.aot` compiles for a TPU slice), `MetricsLog`
(metric windows, progress lines, finiteness), `StopSignals`, and `Hooks` (test-only, inert
unless a test passes one in or sets their environment variables).

Resume order (first that applies): the latest checkpoint in WORKDIR/checkpoints, then
`config.init.checkpoint` (an explicit path, state and data position), then
`config.init.encoder` (an encoder to start from, through an importer), then scratch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview

from data_pipelines import dataset_info
from data_pipelines import input_pipeline
from data_pipelines import storage
from uniemox_jax import checkpointing
from uniemox_jax import datasets
from uniemox_jax import distributed
from uniemox_jax import errors
from uniemox_jax import evaluators
from uniemox_jax import executables
from uniemox_jax import optim
from uniemox_jax import sharding
from uniemox_jax import summaries
from uniemox_jax.evaluators import reports

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


# --- before the first step -----------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """What every task is built from: the config, the mesh, the data and the schedule. `checks`
  collects the problems found so far; a task builder adds its own, and `train` reports them
  all at once before anything is compiled."""
  config: Any
  workdir: str
  mesh: Any
  data_dir: str
  info: dataset_info.DatasetInfo
  local_batch: int
  schedule: optim.Schedule
  checks: errors.Checks
  # config.data.train_fraction < 1: the records of the training split a run keeps.
  subset: Optional[input_pipeline.TrainSubset] = None

  @classmethod
  def prepare(cls, config, workdir: str) -> "Setup":
    checks = errors.Checks()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    devices, procs, accum = mesh.devices.size, jax.process_count(), config.optim.accum_steps
    with checks.check():
      if accum < 1 or config.batch_size % (devices * accum) or config.batch_size % procs:
        raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over "
                         f"{devices} devices x config.optim.accum_steps={accum} "
                         f"micro-batches and {procs} processes")
    info = None
    with checks.check():
      data_dir = datasets.resolve_data_dir(config, workdir)
      info = dataset_info.DatasetInfo.load(data_dir, "config.data.dir")
    if info is None:          # nothing else can be checked without the data
      checks.raise_any()
    schedule, before = None, len(checks.errors)
    with checks.check():
      info.check_splits(data_dir, {s: "config.data.split" for s in config.data.split.split("+")})
    subset, fraction = None, config.data.train_fraction
    if len(checks.errors) == before and fraction != 1.0:
      with checks.check():
        subset = input_pipeline.train_subset(data_dir, config.data.split, fraction, config.seed)
        logging.info("config.data.train_fraction=%g: %d of %d training records (seed %d)",
                     fraction, len(subset.indices), info.num_examples(config.data.split),
                     config.seed)
      before = len(checks.errors)
    if len(checks.errors) == before:        # the schedule counts the records trained on
      with checks.check():
        schedule = optim.resolve_schedule(config, info.num_examples(config.data.split)
                                          if subset is None else len(subset.indices))
    if schedule is None:
      checks.raise_any()
    return cls(config, workdir, mesh, data_dir, info, config.batch_size // procs, schedule,
               checks, subset)


def train_examples(config, workdir: str) -> int:
  """The records a run of `config` trains on, which its schedule counts (and so its compiled
  step: `uniemox_jax.aot` compiles a step to write out with the run's own schedule)."""
  data_dir = datasets.resolve_data_dir(config, workdir)
  info = dataset_info.DatasetInfo.load(data_dir, "config.data.dir")
  if config.data.train_fraction == 1.0:
    return info.num_examples(config.data.split)
  return len(input_pipeline.train_subset(data_dir, config.data.split,
                                         config.data.train_fraction, config.seed).indices)


@dataclasses.dataclass
class Task:
  """What a training task adds to the loop (`pretrain.make_task`, `finetune.make_task`)."""
  init: Callable[[jax.Array], Any]              # key -> (logically boxed) parameters
  loss: Callable[..., Tuple[jax.Array, Dict]]   # (params, constants, batch, key) -> (loss,
  #                                               metrics); metrics[loss_name] is the loss
  dataset: Any                                  # a grain MapDataset of this process's batches
  # The batch's entries that go to devices: name -> (one example's shape, dtype).
  example: Dict[str, Tuple[Tuple[int, ...], Any]]
  loss_name: str
  reads: str                                    # what evaluators may score (evaluators.base)
  meta: Dict[str, Any]                          # kept with every checkpoint
  constants: Any = None                         # host arrays every step reads, never trained
  teacher: Any = None                           # for the evaluators that need it
  load_pretrained: Optional[Callable[[Any], Any]] = None   # host params -> with config.init.encoder
  own_weights: bool = False      # the model brings pretrained weights of its own (a
  #                                transformers backbone): load_pretrained runs without init
  lr_multipliers: Optional[Callable[[Any], Any]] = None    # params -> per-leaf lr factors
  check_checkpoint: Callable[[checkpointing.Checkpoint], None] = lambda ckpt: None
  evaluators: Dict[str, Any] = dataclasses.field(default_factory=dict)  # beside config.evals
  # (step, evaluator name, its result, the state) -> scalars to log: fine-tuning's keep-best.
  on_evaluation: Optional[Callable[..., Dict[str, float]]] = None
  after_training: Optional[Callable[["TrainLoop"], Dict[str, Any]]] = None
  close: Callable[[], None] = lambda: None


def train(config, workdir: str, make_task: Callable[[Setup], Task],
          hooks: Optional["Hooks"] = None) -> Dict[str, Any]:
  """Checks everything, trains to the schedule's end, runs the task's `after_training`;
  returns {"train": the last logged metrics, ...what after_training adds}."""
  loop = build(config, workdir, make_task, hooks)
  try:
    result = {"train": loop.run()}
    if loop.task.after_training is not None:
      result.update(loop.task.after_training(loop))
    return result
  finally:
    loop.close()


def build(config, workdir: str, make_task: Callable[[Setup], Optional[Task]],
          hooks: Optional["Hooks"] = None) -> "TrainLoop":
  """The loop of one run, after every check of its inputs (their ValueErrors and OSErrors are
  the user's: one line each, exit 2). `make_task` adds its own checks to `setup.checks` (and
  may return None when they failed)."""
  with errors.as_user_errors():
    setup = Setup.prepare(config, workdir)
    task = None
    with setup.checks.check():
      task = make_task(setup)
    if task is not None:
      with setup.checks.check():
        _check_restore_source(setup, task)
    setup.checks.raise_any()
    found = evaluators.build(config, workdir, setup.mesh, reads=task.reads,
                             teacher=task.teacher, training=True)
    return TrainLoop(setup, task, {**task.evaluators, **found}, hooks or Hooks.from_environment())


def _check_restore_source(setup: Setup, task: Task) -> None:
  """The checkpoint a run will restore (the workdir's latest, else config.init.checkpoint)
  must fit its data (`task.check_checkpoint`)."""
  own = storage.join(setup.workdir, CHECKPOINTS)
  if checkpointing.latest_finished_step(own) is not None:
    task.check_checkpoint(checkpointing.Checkpoint.open(own, "the workdir's checkpoints"))
  elif setup.config.init.checkpoint:
    task.check_checkpoint(checkpointing.Checkpoint.open(setup.config.init.checkpoint,
                                                        "config.init.checkpoint"))


# --- the loop --------------------------------------------------------------------------------


class TrainLoop:
  """One run: its state functions, checkpoints and evaluators; `run()` trains to the end of the
  schedule (or to a stop signal)."""

  def __init__(self, setup: Setup, task: Task, evals: Dict[str, Any], hooks: "Hooks"):
    self.setup, self.task, self.evaluators, self.hooks = setup, task, evals, hooks
    config = self.config = setup.config
    self.mesh = setup.mesh
    self.logs = storage.LocalMirror(setup.workdir)    # events and metrics, pushed to WORKDIR
    self.program = StepProgram(config, self.mesh, task, setup.schedule)
    ckpt = config.checkpoint
    self.checkpointer = checkpointing.Checkpointer(
        storage.join(setup.workdir, CHECKPOINTS), keep=ckpt.keep, keep_every=ckpt.keep_every,
        asynchronous=ckpt.asynchronous)
    self.final_state = None

  def run(self) -> Dict[str, float]:
    """Trains to the schedule's last step, or saves and stops at a stop signal (SIGTERM,
    Ctrl-C, `hooks.stop_after`). The host stays ahead of the device: each step is dispatched,
    then the next batch is read and placed while it runs; metrics stay on the device until a
    log step (fetched one step late) or a checkpoint (every loss since the last fetch is
    checked finite before saving)."""
    config, total = self.config, self.setup.schedule.total_steps
    iterator = input_pipeline.make_iterator(self.task.dataset, workers=config.data.workers)
    state = self.initial_state(iterator)
    start = int(jax.device_get(state["step"]))
    # Every array's shape, dtype, sharding, mean and std (computed on the devices, as the
    # arrays are sharded), logged once by process 0, as big_vision does.
    parameter_overview.log_parameter_overview(
        state["params"], include_stats="global", jax_logging_process=0,
        msg=f"Parameters at step {start}:")
    program = self.program
    constants = None if self.task.constants is None else sharding.host_to_global(
        self.task.constants, program.replicated)
    base_key = jax.random.key(config.seed + 1)
    log = MetricsLog(self, start)
    stops = StopSignals(config.preemption_poll_steps)
    self.hooks.start(self.logs)
    self._log_start(start, total)
    stopped = None
    try:
      step_fn = self.compile_step(state, constants, base_key) if start < total else None
      for evaluator in self.evaluators.values():
        if start < total and evaluator.period > 0:     # those the run will call
          evaluator.compile_ahead(state["params"])
      batch = self.next_batch(iterator, start + 1) if start < total else None
      for step in range(start + 1, total + 1):
        state, metrics = step_fn(state, constants, batch, base_key)
        self.hooks.trace("step", step)
        log.add(step, metrics)
        self.checkpointer.check()      # an asynchronous save's failure ends the run here
        reason = stops.reached(step) or self.hooks.stop_at(step)
        done = step == total
        log.add_scalars(step, self.evaluate(log, step, state), logged_now=reason or done)
        if reason or done or step % config.checkpoint.every_steps == 0:
          self.save(log, step, state, iterator, final=bool(reason or done))
          if reason:
            stopped = (step, reason)
            break
        if not done:
          batch = self.next_batch(iterator, step + 1)
        log.fetch_due(step)
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
      log.close()
      stops.restore()
      self.hooks.close()
      if jax.process_index() == 0:
        self.logs.push(force=True)
      if hasattr(iterator, "close"):
        iterator.close()
    self.final_state = state
    if stopped is not None and not self.hooks.planned_stop(stopped[0]):
      # A real preemption or Ctrl-C: nothing after training (final evaluations) may run.
      raise (errors.Interrupted if stopped[1] == StopSignals.INTERRUPTED else
             errors.Preempted)(stopped[0])
    return log.last

  def initial_state(self, iterator):
    """The state to start from, following the documented resume order (what is restored was
    checked against this run before the first step)."""
    init = self.config.init
    latest = self.checkpointer.latest_step()
    if latest is not None:
      logging.info("Resuming from %s/%d", self.checkpointer.directory, latest)
      return self.checkpointer.restore(latest, self.program.abstract_state, iterator)
    if init.checkpoint:
      with errors.as_user_errors():
        ckpt, step = checkpointing.open_for_restore(init.checkpoint)
      logging.info("Starting from checkpoint %s/%d", ckpt.directory, step)
      state = ckpt.restore(step, self.program.abstract_state, iterator)
      ckpt.close()
      return state
    state = self.program.init(jax.random.key(self.config.seed))
    if init.encoder or self.task.own_weights:
      with errors.as_user_errors():
        params = self.task.load_pretrained(jax.device_get(state["params"]))
      state = dict(state, params=sharding.host_to_global(
          params, self.program.state_shardings["params"]))
    return state

  def compile_step(self, state, constants, key):
    """The train step compiled before the first batch is read (the batch as shapes, from
    `task.example`), or loaded from config.compiled_step when that file holds the same
    program (`executables`), its time logged; then every process waits for the others (a
    step's first collective would time out on the process that compiled first)."""
    program, started = self.program, time.perf_counter()
    if self.config.compiled_step:
      # Lowered from shapes, as `uniemox_jax.aot` lowers the step it writes: lowered from the
      # arrays, the text holds a second copy of a random-bits function, and never matches.
      lowered = program.step.lower(*program.abstract_inputs())
      with errors.as_user_errors():
        compiled = executables.load(self.config.compiled_step, lowered,
                                    list(self.mesh.devices.flat), program.compiler_options)
      logging.info("Loaded the train step from %s in %.1f s (compiled ahead, not here)",
                   self.config.compiled_step, time.perf_counter() - started)
    else:
      # From the arrays, as before the compiled-step files (a step called directly is
      # compiled so too).
      compiled = program.step.lower(state, constants, program.batch_shapes(), key).compile()
      cache = jax.config.jax_compilation_cache_dir
      logging.info("Compiled the train step in %.1f s%s", time.perf_counter() - started,
                   f" (the persistent cache, {cache}, keeps it for the next run)" if cache
                   else "")
    distributed.barrier("train step compiled")
    return compiled

  def next_batch(self, iterator, step: int) -> Dict[str, jax.Array]:
    """The batch of `step`, read from the pipeline and placed on the devices."""
    host = next(iterator)
    self.hooks.batch(step, host)
    return {k: jax.make_array_from_process_local_data(self.program.batch_sharding, host[k])
            for k in self.task.example}

  def evaluate(self, log: "MetricsLog", step: int, state) -> Dict[str, float]:
    """The evaluators due at `step`: their reports (WORKDIR/evaluations/checkpoints-<step>/
    <name>/), images (TensorBoard) and scalars (returned, as "<name>/<metric>"); the time
    they take is left out of images/s."""
    scalars, started = {}, time.perf_counter()
    for name, evaluator in self.evaluators.items():
      if not evaluator.due(step, self.setup.schedule.total_steps):
        continue
      result = evaluator.run(state["params"])
      evaluator.write(result, reports.out_dir(storage.join(self.checkpointer.directory,
                                                           str(step))),
                      at=f"{self.setup.workdir} (step {step})")
      scalars.update({f"{name}/{k}": v for k, v in result.scalars.items()})
      if result.images:
        log.writer.write_images(step, {f"{name}/{k}": v[None] for k, v in result.images.items()})
      if self.task.on_evaluation is not None:
        scalars.update(self.task.on_evaluation(step, name, result, state))
    if scalars:
      log.exclude(time.perf_counter() - started)
    return scalars

  def save(self, log: "MetricsLog", step: int, state, iterator, final: bool) -> None:
    """Checks every loss up to `step` finite (a non-finite step is never saved), then saves
    the state and the iterator (which has given exactly the batches of steps 1..step: its
    state resumes at step + 1)."""
    log.fetch(step, final=final)
    self.checkpointer.save(step, state, iterator, meta=self.task.meta)
    if jax.process_index() == 0:
      self.logs.push(force=True)
    self.hooks.saved(step)
    if final and step < self.setup.schedule.total_steps:
      self.checkpointer.wait()
      logging.warning("Saved step %d, stopping", step)

  def _log_start(self, start: int, total: int) -> None:
    config = self.config
    if start >= total:
      logging.info("Nothing to do: %s already holds the final step %d", self.setup.workdir,
                   total)
    logging.info("Training steps %d..%d (%d per epoch), global batch %d on %s, peak lr %.3g "
                 "(base_lr %.3g x %d / 256)", start, total, self.setup.schedule.steps_per_epoch,
                 config.batch_size, dict(self.mesh.shape), optim.peak_lr(config),
                 config.optim.base_lr, config.batch_size)
    self.hooks.before_first_step()

  def close(self) -> None:
    self.checkpointer.close()
    self.task.close()


# --- the step ----------------------------------------------------------------------------------


class StepProgram:
  """The jitted train step of a task on a mesh, built from shapes alone: the optimizer, the
  state's logical shardings and abstract tree, `init` and `step`. Nothing in it reads data or
  touches a device, so the same program is also compiled ahead of time for a TPU slice that
  is not here (`uniemox_jax.aot`)."""

  def __init__(self, config, mesh, task: Task, schedule: optim.Schedule):
    self.config, self.mesh, self.task = config, mesh, task
    self.lr = optim.learning_rate(config, schedule)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.compiler_options = sharding.compiler_options(mesh, config.mesh.windowed_einsum)
    self.replicated = sharding.replicated(mesh)
    abstract_boxed = jax.eval_shape(task.init, jax.random.key(0))
    params = nn.unbox(abstract_boxed)
    self.tx = optim.make_optimizer(
        config, self.lr, task.lr_multipliers(params) if task.lr_multipliers else None)
    # The state's abstract tree from the abstract parameters (one trace of the model, not two).
    abstract_state = jax.eval_shape(lambda p: self._state(p, self.tx.init(p)), abstract_boxed)
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_state), mesh, sharding.LOGICAL_RULES)
    self.abstract_state = checkpointing.abstract_with_shardings(nn.unbox(abstract_state),
                                                                self.state_shardings)
    self.init = jax.jit(lambda key: nn.unbox(self._init_boxed(key)),
                        out_shardings=self.state_shardings)
    # The logical axis rules are in scope while the step is traced, so the models' activation
    # annotations become sharding constraints.
    self.step = jax.jit(sharding.with_rules(self.train_step, mesh),
                        in_shardings=(self.state_shardings, self.replicated,
                                      self.batch_sharding, self.replicated),
                        out_shardings=(self.state_shardings, self.replicated),
                        donate_argnums=(0,), compiler_options=self.compiler_options)

  @staticmethod
  def _state(params, opt_state):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}

  def _init_boxed(self, key):
    params = self.task.init(key)
    return self._state(params, self.tx.init(params))

  def batch_shapes(self) -> Dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes (`task.example` at config.batch_size), as shapes with
    the batch sharding."""
    return {k: jax.ShapeDtypeStruct((self.config.batch_size,) + tuple(shape), dtype,
                                    sharding=self.batch_sharding)
            for k, (shape, dtype) in self.task.example.items()}

  def abstract_inputs(self):
    """The step's arguments as shapes with their shardings, for `step.lower`: the state, the
    task's constants, the batch and the key."""
    constants = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.replicated),
        self.task.constants)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
    return self.abstract_state, constants, self.batch_shapes(), key

  def train_step(self, state, constants, batch, base_key):
    key = jax.random.fold_in(base_key, state["step"])
    grads, terms = self.gradients(state["params"], constants, batch, key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   update_norm=optax.tree.norm(updates),
                   learning_rate=self.lr(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def gradients(self, params, constants, batch, key):
    """Gradients and metrics of one global batch, in `config.optim.accum_steps`
    micro-batches whose gradients are averaged (to bound activation memory). Each
    micro-batch takes the same rows of every device's shard, so no data moves between
    devices; batch-wide terms (pretraining's L1, mixup's partner) then span one micro-batch."""
    grad_fn = jax.value_and_grad(self.task.loss, has_aux=True)
    accum = self.config.optim.accum_steps
    if accum == 1:
      (_, terms), grads = grad_fn(params, constants, batch, key)
      return grads, terms
    shards = self.mesh.devices.size

    def split(x):   # [B, ...] -> [accum, B / accum, ...], rows kept on their device
      x = x.reshape((shards, accum, x.shape[0] // (shards * accum)) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1).reshape((accum, x.shape[0] * x.shape[2]) + x.shape[3:])
    micro_batches = jax.tree.map(split, batch)

    def body(carry, inputs):
      i, micro = inputs
      (_, terms), grads = grad_fn(params, constants, micro, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (grads, terms)), None
    (_, terms_shape), grads_shape = jax.eval_shape(
        grad_fn, params, constants, jax.tree.map(lambda x: x[0], micro_batches), key)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, terms_shape))
    (grads, terms), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_batches))
    return jax.tree.map(lambda g: g / accum, (grads, terms))


# --- metrics ---------------------------------------------------------------------------------


class MetricsLog:
  """The metrics of dispatched steps until they are fetched (at log steps, one step late, and
  before each checkpoint), checked finite, and logged: one line per step in metrics.jsonl, a
  progress line, TensorBoard (process 0). Evaluator scalars join their step's line."""

  def __init__(self, loop: TrainLoop, start: int):
    config = loop.config
    self.every, self.batch_size = config.log_every_steps, config.batch_size
    self.loss_name, self.hooks, self.logs = loop.task.loss_name, loop.hooks, loop.logs
    self.total = loop.setup.schedule.total_steps
    self.main = jax.process_index() == 0
    self.writer = summaries.SummaryWriter(self.logs.local) if self.main else \
        summaries.NullWriter()
    self.profile = summaries.ProfileWindow(self.logs.local, start + config.profile.first_step,
                                           config.profile.num_steps) \
        if self.main and config.profile.num_steps > 0 else None
    self.window: List[Tuple[int, Any]] = []         # (step, device metrics) not yet fetched
    self.pending: Dict[int, Dict[str, float]] = {}  # evaluator scalars of a step to be logged
    self.clock = (time.perf_counter(), start)       # (time, step) of the last logged line
    self.started = (time.perf_counter(), start)
    self.due: Optional[int] = None
    self.last: Dict[str, float] = {}
    self._trim(start)

  def add(self, step: int, metrics) -> None:
    self.window.append((step, metrics))
    if self.profile is not None:
      self.profile(step, metrics)

  def add_scalars(self, step: int, scalars: Dict[str, float], logged_now: bool) -> None:
    """Scalars of `step` (its evaluators'): with the step's own line when it has one (a log
    step, or the last), else a line of their own."""
    if not scalars:
      return
    if step % self.every == 0 or logged_now:
      self.pending[step] = scalars
    else:
      self._log(step, scalars)

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (evaluation) out of images/s."""
    self.clock = (self.clock[0] + seconds, self.clock[1])

  def fetch_due(self, step: int) -> None:
    """Fetches the previous log step, now that `step` is queued behind it; marks `step`."""
    if self.due is not None:
      self.fetch(self.due)
      self.due = None
    if step % self.every == 0:
      self.due = step

  def fetch(self, upto: int, final: bool = False) -> None:
    """Brings the metrics of the dispatched steps up to `upto` to the host: every loss is
    checked finite; log steps (and the final one) are logged with the images/s since the
    previous line."""
    self.hooks.trace("fetch", upto)
    ready = [(s, m) for s, m in self.window if s <= upto]
    self.window = [(s, m) for s, m in self.window if s > upto]
    if not ready:
      return
    for (s, m), loss in zip(ready, jax.device_get([m[self.loss_name] for _, m in ready])):
      if not np.isfinite(loss):
        self._check(s, m)          # raises, naming the step and every metric
    logged = {}
    for s, m in ready:
      if s % self.every == 0 or (final and s == ready[-1][0]):
        values = self._check(s, m)
        now, (since, since_step) = time.perf_counter(), self.clock
        values["images_per_sec"] = (s - since_step) * self.batch_size / max(now - since, 1e-9)
        self.clock = (now, s)
        values.update(self.pending.pop(s, {}))
        self._log(s, values)
        logged[s] = values
    self.last = logged.get(ready[-1][0]) or self._check(*ready[-1])

  def _check(self, step: int, metrics) -> Dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values[self.loss_name]):
      raise FloatingPointError(
          f"non-finite loss at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in
                                                        sorted(values.items()))
          + "; the last checkpoint before it is kept")
    return values

  def _log(self, step: int, values: Dict[str, float]) -> None:
    self.hooks.trace("log", step, values)
    self.writer.write_scalars(step, values)
    if self.main:
      path = self.logs.path(METRICS_FILE)
      with storage.naming(path), open(path, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
      self.logs.push()
      logging.info("%s", self._progress(step, values))

  def _progress(self, step: int, values: Dict[str, float]) -> str:
    """"step 50/300 (17%)  total 0.812  l1 0.21 ...  1234 img/s  2m10s left"."""
    since, first = self.started
    done = step - first
    left = (self.total - step) * (time.perf_counter() - since) / done if done > 0 else \
        float("nan")
    shown = [f"{k} {v:.4g}" for k, v in values.items()
             if k not in ("images_per_sec", "learning_rate") and not k.endswith("_norm")]
    parts = [f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%)",
             "  ".join(shown)]
    if "images_per_sec" in values:
      parts.append(f"{values['images_per_sec']:.0f} img/s")
    if np.isfinite(left):
      parts.append(f"{_duration(left)} left")
    return "  ".join(p for p in parts if p)

  def _trim(self, start: int) -> None:
    """A resumed run logs again the steps after its checkpoint: drop their old lines, so the
    file keeps one line per step."""
    if not self.main:
      return
    path = self.logs.pull(METRICS_FILE)
    if not os.path.exists(path):
      return
    with open(path) as f:
      lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= start]
    if len(keep) != len(lines):
      storage.write_text(path, "".join(keep))

  def close(self) -> None:
    self.writer.close()
    if self.profile is not None:
      self.profile.close()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- stop signals ----------------------------------------------------------------------------


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


# --- test hooks ------------------------------------------------------------------------------

# Environment variables of the hooks, for the tests' subprocesses.
KILL_DURING_SAVE_ENV = "UNIEMOX_FAULT_KILL_DURING_SAVE"   # SIGKILL after dispatching that save
FAIL_BEFORE_STEP_ENV = "UNIEMOX_FAULT_FAIL_BEFORE_STEP"   # that process index raises (a bug)
BATCH_HASHES_ENV = "UNIEMOX_TEST_BATCH_HASHES"            # "1": WORKDIR/batch_hashes.jsonl


@dataclasses.dataclass
class Hooks:
  """Everything the tests reach into a run with, in one object; inert by default.

  kill_during_save: SIGKILL this process right after dispatching the save of this step, while
    the asynchronous write is still in flight. fail_before_step: raise before the first step.
  batch_hashes: record a fingerprint of every step's host batch in WORKDIR/batch_hashes.jsonl.
  stop_after: save and stop after this step, as a preemption would, but return normally.
  trace: called with ("step" | "batch" | "fetch" | "log", step[, values]) as the loop goes."""
  kill_during_save: int = -1
  fail_before_step: bool = False
  batch_hashes: bool = False
  stop_after: Optional[int] = None
  trace: Callable[..., None] = lambda *event: None
  _hashes: Any = dataclasses.field(default=None, repr=False)

  @classmethod
  def from_environment(cls) -> "Hooks":
    failing = os.environ.get(FAIL_BEFORE_STEP_ENV)
    return cls(kill_during_save=int(os.environ.get(KILL_DURING_SAVE_ENV, "-1")),
               fail_before_step=failing is not None and failing == str(jax.process_index()),
               batch_hashes=os.environ.get(BATCH_HASHES_ENV) == "1")

  def start(self, logs: storage.LocalMirror) -> None:
    self._hashes = open(logs.pull("batch_hashes.jsonl"), "a") if self.batch_hashes else None

  def batch(self, step: int, host: Dict[str, np.ndarray]) -> None:
    """The host batch of `step` was read."""
    if self._hashes is not None:
      self._hashes.write(json.dumps({"step": step, "hash": batch_fingerprint(host)}) + "\n")
      self._hashes.flush()
    self.trace("batch", step)

  def before_first_step(self) -> None:
    if self.fail_before_step:
      raise RuntimeError(f"injected fault before the first step ({FAIL_BEFORE_STEP_ENV})")

  def stop_at(self, step: int) -> int:
    return StopSignals.PREEMPTED if step == self.stop_after else StopSignals.NONE

  def planned_stop(self, step: int) -> bool:
    return step == self.stop_after

  def saved(self, step: int) -> None:
    if step == self.kill_during_save:
      os.kill(os.getpid(), signal.SIGKILL)

  def close(self) -> None:
    if self._hashes is not None:
      self._hashes.close()
      self._hashes = None


def batch_fingerprint(batch: Dict[str, np.ndarray]) -> str:
  h = hashlib.sha1()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]

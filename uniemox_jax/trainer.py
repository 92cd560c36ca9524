"""UniEmoX pretraining: one jitted, sharded step over a device mesh, orbax checkpoints with
exact resume, clu metrics. `pretrain(config, workdir)` is the main job.

Resume order (first that applies): the latest checkpoint in WORKDIR/checkpoints, then
`config.init.checkpoint` (an explicit path, state and data position), then
`config.init.encoder` (an encoder to start from, through an importer), then scratch.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import time
from typing import Any, Callable, Dict

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from data_pipelines import input_pipeline
from uniemox_jax import augment
from uniemox_jax import checkpointing
from uniemox_jax import models
from uniemox_jax import objective
from uniemox_jax import optim
from uniemox_jax import sharding
from uniemox_jax.teacher import clip
from uniemox_jax.teacher import tiny

# Names of encoder importers for config.init.encoder_format; the checkpoint-import work adds
# PyTorch formats here. Each maps (path, encoder params template) -> encoder params.
ENCODER_IMPORTERS: Dict[str, Callable[[str, Any], Any]] = {}

# Fault injection for tests: SIGKILL this process right after dispatching the save of this
# step, while the asynchronous write is still in flight.
KILL_DURING_SAVE_ENV = "UNIEMOX_FAULT_KILL_DURING_SAVE"


def register_encoder_importer(name: str, fn: Callable[[str, Any], Any]) -> None:
  ENCODER_IMPORTERS[name] = fn


def load_teacher(config, workdir: str) -> clip.ClipTeacher:
  """The teacher named by config.teacher; with `tiny`, one made once in WORKDIR/tiny_clip."""
  name = config.teacher.name
  if config.teacher.tiny:
    name = os.path.join(workdir, "tiny_clip")
    if jax.process_index() == 0 and not os.path.exists(
        os.path.join(name, "flax_model.msgpack")):
      tiny.make_tiny_clip(name, embed_dim=config.model.decoder.width, seed=config.seed)
    multihost_utils.sync_global_devices("tiny teacher written")
  return clip.ClipTeacher.load(name, dtype=models.dtype(config.teacher.dtype,
                                                        "config.teacher.dtype"),
                               normalization=config.teacher.normalization)


def resolve_data_dir(config, workdir: str) -> str:
  """config.data.dir, or (with config.data.synthetic) the synthetic set built in the workdir."""
  if config.data.dir:
    return config.data.dir
  if not config.data.get("synthetic", False):
    raise ValueError("config.data.dir is empty: point it at a folder written by "
                     "`python -m data_pipelines.convert`")
  out = os.path.join(workdir, "synthetic")
  if jax.process_index() == 0 and not os.path.exists(
      os.path.join(out, input_pipeline.INFO_FILE)):
    from data_pipelines import convert  # pylint: disable=g-import-not-at-top
    convert.main(["--source", "synthetic", "--name", "synthetic", "--out", out,
                  "--per_class", config.data.synthetic_per_class,
                  "--image_size", str(config.data.synthetic_image_size),
                  "--workers", "1", "--no_progress"])
  multihost_utils.sync_global_devices("synthetic data written")
  return out


def _num_examples(info: Dict[str, Any], split: str) -> int:
  return sum(info["splits"][s]["num_records"] for s in split.split("+")
             if s in info["splits"])


class Preemption:
  """SIGTERM -> save and exit cleanly. With several processes they agree on the step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint and stop")
    self.requested = True

  def reached(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _device_batch_keys(batch: Dict[str, np.ndarray]):
  keys = ["scene", "person"]
  keys += ["text_emb"] if "text_emb" in batch else ["input_ids", "attention_mask"]
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"pretraining batches lack {missing}: convert the data with "
                   "--text_embeddings, or give the pipeline a tokenizer")
  return keys


def batch_fingerprint(batch: Dict[str, np.ndarray]) -> str:
  h = hashlib.sha1()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]


class Trainer:
  """Everything one pretraining run holds; `run()` trains to config.total_steps."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.history = []     # (step, metrics) of every logged step
    self.model = models.pretrain_model(config.model)
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    num_devices, procs = self.mesh.devices.size, jax.process_count()
    accum = config.optim.get("accum_steps", 1)
    if accum < 1 or config.batch_size % (num_devices * accum) or config.batch_size % procs:
      raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over "
                       f"{num_devices} devices x config.optim.accum_steps={accum} "
                       f"micro-batches and {procs} processes")
    self.data_dir = resolve_data_dir(config, workdir)
    self.teacher = load_teacher(config, workdir)
    objective.check_compatible(self.model, self.teacher)
    info = input_pipeline.load_info(self.data_dir)
    self.schedule = optim.resolve_schedule(config, _num_examples(info, config.data.split))
    self.lr = optim.learning_rate(config, self.schedule)
    self.tx = optim.make_optimizer(config, self.lr)
    self.local_batch = config.batch_size // procs
    tokenize = None
    if not info.get("text_emb_dim"):
      tokenize = functools.partial(clip.tokenize_one, self.teacher.tokenizer)
    self.dataset = input_pipeline.pretrain_dataset(
        self.data_dir, config.data.split, batch_size=self.local_batch,
        image_size=config.model.image_size, person_view=config.data.person_view,
        seed=config.seed, process_index=jax.process_index(), process_count=procs,
        tokenize=tokenize)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self._build_state_fns()
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
        asynchronous=config.checkpoint.asynchronous)

  # --- state -----------------------------------------------------------------------------

  def _example_inputs(self):
    size, width = self.config.model.image_size, self.config.model.decoder.width
    img = jnp.zeros((2, size, size, 3), jnp.float32)
    emb = jnp.zeros((2, width), jnp.float32)
    return img, img, emb, emb, jnp.float32(1.0)

  def _init_boxed(self, key):
    params = self.model.init({"params": key, "mask": key, "dropout": key},
                             *self._example_inputs())["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def _build_state_fns(self):
    abstract_boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_boxed), self.mesh, sharding.LOGICAL_RULES)
    self.abstract_state = checkpointing.abstract_with_shardings(
        nn.unbox(abstract_boxed), self.state_shardings)
    self._init = jax.jit(lambda k: nn.unbox(self._init_boxed(k)),
                         out_shardings=self.state_shardings)
    self._step = jax.jit(self._train_step,
                         in_shardings=(self.state_shardings, self.replicated,
                                       self.batch_sharding, self.replicated),
                         out_shardings=(self.state_shardings, self.replicated),
                         donate_argnums=(0,))

  def initial_state(self, iterator):
    """The state to start from, following the documented resume order."""
    cfg = self.config.init
    latest = self.checkpointer.latest_step()
    if latest is not None:
      logging.info("Resuming from %s/%d", self.checkpointer.directory, latest)
      return self.checkpointer.restore(latest, self.abstract_state, iterator)
    if cfg.checkpoint:
      ckpt, step = checkpointing.open_for_restore(cfg.checkpoint)
      logging.info("Starting from checkpoint %s/%d", ckpt.directory, step)
      state = ckpt.restore(step, self.abstract_state, iterator)
      ckpt.close()
      return state
    state = self._init(jax.random.key(self.config.seed))
    if cfg.encoder:
      if cfg.encoder_format not in ENCODER_IMPORTERS:
        raise ValueError(f"config.init.encoder_format={cfg.encoder_format!r}: known formats "
                         f"are {sorted(ENCODER_IMPORTERS)}")
      encoder = ENCODER_IMPORTERS[cfg.encoder_format](cfg.encoder, state["params"]["encoder"])
      params = dict(state["params"], encoder=encoder)
      state = dict(state, params=sharding.host_to_global(params, self.state_shardings["params"]))
      logging.info("Encoder initialized from %s (%s)", cfg.encoder, cfg.encoder_format)
    return state

  # --- the step ---------------------------------------------------------------------------

  def _train_step(self, state, teacher_params, batch, base_key):
    key = jax.random.fold_in(base_key, state["step"])
    batch = dict(batch, scene=augment.normalize(batch["scene"]),
                 person=augment.normalize(batch["person"]))

    grads, terms = self._gradients(state["params"], teacher_params, batch, key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   update_norm=optax.tree.norm(updates),
                   learning_rate=self.lr(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def _gradients(self, params, teacher_params, batch, key):
    """Gradients and loss terms of one global batch, in `config.optim.accum_steps`
    micro-batches whose gradients are averaged (to bound activation memory). Each
    micro-batch takes the same rows of every device's shard, so no data moves between
    devices; L1's B x B similarities then span one micro-batch, not the global batch."""

    def loss_fn(p, micro, k):
      terms, _ = objective.pretrain_losses(self.model, p, self.teacher, teacher_params, micro,
                                           k, train=True)
      return terms["total"], terms
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = self.config.optim.get("accum_steps", 1)
    if accum == 1:
      (_, terms), grads = grad_fn(params, batch, key)
      return grads, terms
    shards = self.mesh.devices.size

    def split(x):   # [B, ...] -> [accum, B / accum, ...], rows kept on their device
      x = x.reshape((shards, accum, x.shape[0] // (shards * accum)) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1).reshape((accum, x.shape[0] * x.shape[2]) + x.shape[3:])
    micro_batches = jax.tree.map(split, batch)

    def body(carry, inputs):
      i, micro = inputs
      (_, terms), grads = grad_fn(params, micro, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (grads, terms)), None
    (_, terms_shape), grads_shape = jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), key)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, terms_shape))
    (grads, terms), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_batches))
    return jax.tree.map(lambda g: g / accum, (grads, terms))

  def to_global(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, batch[k])
            for k in _device_batch_keys(batch)}

  # --- the loop ---------------------------------------------------------------------------

  def run(self) -> Dict[str, float]:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    cfg = self.config
    iterator = input_pipeline.make_iterator(self.dataset, workers=cfg.data.workers)
    state = self.initial_state(iterator)
    start = int(jax.device_get(state["step"]))
    total = self.schedule.total_steps
    teacher_params = sharding.host_to_global(self.teacher.params, self.replicated)
    base_key = jax.random.key(cfg.seed + 1)
    writer = metric_writers.create_default_writer(self.workdir,
                                                  just_logging=jax.process_index() > 0)
    hooks = []
    if jax.process_index() == 0:
      hooks.append(periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                                   every_steps=cfg.log_every_steps))
      if cfg.profile.num_steps > 0:
        hooks.append(periodic_actions.Profile(logdir=self.workdir,
                                              first_profile=start + cfg.profile.first_step,
                                              num_profile_steps=cfg.profile.num_steps))
    hashes = open(os.path.join(self.workdir, "batch_hashes.jsonl"), "a") if \
        cfg.get("log_batch_hashes", False) else None
    preemption = Preemption()
    kill_at = int(os.environ.get(KILL_DURING_SAVE_ENV, "-1"))
    pending, last, window_start, window_steps = None, {}, time.perf_counter(), 0
    if start >= total:
      logging.info("Nothing to do: %s already holds the final step %d", self.workdir, total)
    logging.info("Training steps %d..%d (%d per epoch), global batch %d on %s", start, total,
                 self.schedule.steps_per_epoch, cfg.batch_size, dict(self.mesh.shape))
    try:
      for step in range(start, total):
        host_batch = next(iterator)
        if hashes is not None:
          hashes.write(json.dumps({"step": step + 1,
                                   "hash": batch_fingerprint(host_batch)}) + "\n")
          hashes.flush()
        state, metrics = self._step(state, teacher_params, self.to_global(host_batch),
                                    base_key)
        # The previous step's metrics are fetched while this one runs.
        if pending is not None:
          last = self._check(*pending)
          if pending[0] % cfg.log_every_steps == 0:
            elapsed = time.perf_counter() - window_start
            last["images_per_sec"] = window_steps * cfg.batch_size / max(elapsed, 1e-9)
            self._log(writer, pending[0], last)
            window_start, window_steps = time.perf_counter(), 0
        pending = (step + 1, metrics)
        window_steps += 1
        for hook in hooks:
          hook(step + 1)
        preempted = preemption.reached()
        done = step + 1 == total
        if preempted or done or (step + 1) % cfg.checkpoint.every_steps == 0:
          last = self._check(*pending)     # never checkpoint a non-finite step
          self.checkpointer.save(step + 1, state, iterator)
          if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
          if preempted:
            logging.warning("Preempted: saved step %d, stopping", step + 1)
            break
      if pending is not None:
        last = self._check(*pending)
        self._log(writer, pending[0], last)
    finally:
      self.checkpointer.wait()
      writer.flush()
      preemption.restore()
      if hashes is not None:
        hashes.close()
      if hasattr(iterator, "close"):
        iterator.close()
    self.final_state = state
    return last

  def _log(self, writer, step: int, values: Dict[str, float]) -> None:
    """TensorBoard + logging through clu, and one JSON line per log step (process 0)."""
    self.history.append((step, values))
    writer.write_scalars(step, values)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")

  @staticmethod
  def _check(step: int, metrics) -> Dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["total"]):
      raise FloatingPointError(
          f"non-finite loss at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in
                                                        sorted(values.items()))
          + "; the last checkpoint before it is kept")
    return values


def pretrain(config, workdir: str) -> Dict[str, float]:
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.checkpointer.close()

"""What every task's config holds besides its model and recipe: the runtime sections (seed,
data reading, mesh, checkpoints, where a run starts from, logging, preemption, compilation
cache, profiler). `configs/pretrain.py` and `configs/finetune.py` build on it."""
import ml_collections


def runtime(task: str, data: str = "", split: str = "train", checkpoint_keep: int = 3,
            keep_every: int = 0, profile_steps: int = 0, **init) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  # draft_decode: JPEGs decoded at 1/2-1/8 scale when every crop allows (see
  # data_pipelines/transforms.py); False decodes every image fully, as the reference does.
  # synthetic: the demo's generated set, built in WORKDIR/synthetic when dir is "".
  # train_fraction < 1: train on that seeded (config.seed), stratified fraction of each class
  # of the split (at least one image per class; the reference's --split_ratio).
  config.data = dict(dir=data, split=split, workers=8, draft_decode=True, synthetic=False,
                     synthetic_per_class="40,8,8", synthetic_image_size=64, train_fraction=1.0)
  config.total_steps = 0                   # > 0 overrides total_epochs
  # fsdp > 1 shards params and optimizer state. windowed_einsum: let the TPU compiler split
  # the fsdp matmuls into loops over their all-gathers and reduce-scatters; off, a 16-way
  # fsdp L/16 step takes half the time by its estimate (docs/benchmarks.md). TPU only.
  config.mesh = dict(data=-1, fsdp=1, windowed_einsum=False)
  config.checkpoint = dict(every_steps=1000, keep=checkpoint_keep, keep_every=keep_every,
                           asynchronous=True)
  # Resume order: WORKDIR checkpoint > init.checkpoint > init.encoder (+ format) > scratch.
  config.init = dict(dict(checkpoint="", encoder="", encoder_format=""), **init)
  config.log_every_steps = 50
  config.eval_batch_size = 1024            # global; the last batch is padded and masked
  # Several processes agree on a SIGTERM or Ctrl-C every this many steps (an all-gather).
  config.preemption_poll_steps = 10
  # JAX's persistent cache of compiled programs: reruns and resumes compile less. "auto":
  # $UNIEMOX_CACHE_DIR/jax_cache (default ~/.cache/uniemox_jax/jax_cache); a path or gs://
  # URL; "" off.
  config.compilation_cache_dir = "auto"
  # A train step compiled ahead for this run's devices (`uniemox_jax.tools.aot --write_step
  # FILE`, local or gs://): loaded instead of compiled, after checking it is this run's step.
  config.compiled_step = ""
  config.profile = dict(first_step=10, num_steps=profile_steps)
  return config

r"""The embedded default: a tiny UniEmoX and a tiny random CLIP teacher, on 2 CPU cores.

  python -m uniemox_jax.main --config configs/demo.py --workdir workdirs/demo
  python -m uniemox_jax.evaluate --config configs/demo.py --checkpoint workdirs/demo/checkpoints

Builds the synthetic emotion dataset in WORKDIR/synthetic and a random tiny CLIP in
WORKDIR/tiny_clip (loaded through the same code as a real checkpoint), then pretrains for
200 steps, logging zero-shot accuracy, a linear probe and a reconstruction grid of the
synthetic test split at steps 100 and 200 (TensorBoard, metrics.jsonl and
WORKDIR/evaluations/). Rerunning resumes from WORKDIR/checkpoints.
"""
from uniemox_jax import config_utils

pretrain = config_utils.sibling(__file__, "pretrain")


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, evals=True)
  config = pretrain.get_config("vit=mu/8")
  model = config.model
  model.image_size = 32
  model.decoder = dict(width=64, depth=1, heads=2)
  model.fusion_heads = 4
  model.dtype = "float32"
  # Two-block stacks: unrolled, nothing to gain from loops and remat on the CPU (the recipes
  # scan; the tests run both layouts).
  model.update(scan=False, remat="none")
  config.teacher.scan = False
  config.teacher.tiny = True
  config.teacher.dtype = "float32"
  config.data.update(split="train", workers=0, synthetic=True)
  config.batch_size = 32
  config.total_steps = 200
  config.optim.update(base_lr=4e-3, warmup_steps=30)
  config.checkpoint.update(every_steps=100, keep=2, keep_every=0)
  config.log_every_steps = 25
  # Watch the representation while it trains: at steps 100 and 200 (and from the command).
  # evals=False: none during training (the tests' runs that check other things).
  config.eval_batch_size = 32
  for spec in config.evals.values():
    spec.period = 100 if arg.evals else 0
  config.evals.linear_probe.update(train_split="train", steps=200, weight_decays=(1e-3,))
  config.evals.reconstruction.num = 4
  config.profile.num_steps = 0
  return config

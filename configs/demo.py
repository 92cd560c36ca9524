r"""The embedded default: a tiny UniEmoX and a tiny random CLIP teacher, on 2 CPU cores.

  python -m uniemox_jax.main --config configs/demo.py --workdir workdirs/demo

Builds the synthetic emotion dataset in WORKDIR/synthetic and a random tiny CLIP in
WORKDIR/tiny_clip (loaded through the same code as a real checkpoint), then pretrains for
200 steps. Rerunning resumes from WORKDIR/checkpoints.
"""
from configs import pretrain


def get_config(arg=None):
  del arg
  config = pretrain.get_config("vit=mu/8")
  model = config.model
  model.image_size = 32
  model.decoder = dict(width=64, depth=1, heads=2)
  model.fusion_heads = 4
  model.dtype = "float32"
  config.teacher.tiny = True
  config.teacher.dtype = "float32"
  config.data.update(split="train", workers=0, synthetic=True)
  config.batch_size = 32
  config.total_steps = 200
  config.optim.update(base_lr=4e-3, warmup_steps=30)
  config.checkpoint.update(every_steps=100, keep=2, keep_every=0)
  config.log_every_steps = 25
  config.profile.num_steps = 0
  config.compilation_cache_dir = "workdirs/jax_cache"   # a rerun skips most compilation
  return config

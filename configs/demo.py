r"""The embedded default: a tiny UniEmoX and a tiny random CLIP teacher, on 2 CPU cores.

  python -m uniemox_jax.main --config configs/demo.py --workdir workdirs/demo

The teacher is created in WORKDIR/tiny_clip (random weights, a small BPE tokenizer) and
loaded from there through the same code as a real CLIP checkpoint.
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
  config.batch_size = 16
  return config

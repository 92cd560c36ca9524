r"""Linear probe of a pretrained encoder (frozen features, a linear classifier on them).

  python -m uniemox_jax.main --config configs/linear_probe.py:dataset=emo8,data=/data/emo8,\
init=/ckpt/uniemox-l16/checkpoints --workdir WORKDIR

The variant keys are those of configs/finetune.py. `demo=True` probes the demo's encoder on the
synthetic data (workdirs/demo).
"""
from uniemox_jax import config_utils

demo_finetune = config_utils.sibling(__file__, "demo_finetune")
finetune = config_utils.sibling(__file__, "finetune")


def get_config(arg=None):
  arg = arg or ""
  if "demo=True" in arg.split(","):
    config = demo_finetune.get_config(",".join(a for a in arg.split(",") if a != "demo=True"))
  else:
    config = finetune.get_config(arg)
  config.task = "linear_probe"
  config.probe = dict(steps=500, lr=1e-2, weight_decays=(0.0, 1e-4, 1e-3, 1e-2))
  return config

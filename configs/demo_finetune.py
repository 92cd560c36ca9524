r"""The embedded default's second half: fine-tune the demo-pretrained tiny encoder on the
synthetic emotion dataset, validate every epoch, then evaluate the best state on its test split.

  python -m uniemox_jax.main --config configs/demo_finetune.py --workdir workdirs/demo/finetune

`pretrained=DIR` (default workdirs/demo) is the pretraining demo's workdir: its
checkpoints give the encoder and its synthetic/ folder the data.
"""
import os

from uniemox_jax import config_utils

demo = config_utils.sibling(__file__, "demo")
finetune = config_utils.sibling(__file__, "finetune")


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, pretrained="workdirs/demo")
  # The synthetic set has EmoSet's eight classes.
  config = finetune.get_config("dataset=emoset,vit=mu/8")
  config.dataset = "synthetic"
  pretrain = demo.get_config()
  config.model.update(image_size=pretrain.model.image_size, dtype="float32", drop_path=0.1,
                      scan=pretrain.model.scan, remat=pretrain.model.remat)
  config.data.update(dir=os.path.join(arg.pretrained, "synthetic"), workers=0)
  config.init.encoder = os.path.join(arg.pretrained, "checkpoints")
  config.batch_size = 32
  config.eval_batch_size = 32
  config.total_epochs = 20
  config.optim.update(base_lr=2e-3, warmup_epochs=3)
  config.augment.update(rand_augment=False, mixup_alpha=0.0, cutmix_alpha=0.0)
  config.eval_every_epochs = 5
  config.checkpoint.update(every_steps=100, keep=1)
  config.log_every_steps = 50
  return config

r"""UniEmoX pretraining: the paper's recipe and its ablations (METHOD.md 1-4).

  python -m uniemox_jax.main --config configs/pretrain.py:vit=L/16 --workdir WORKDIR

Variant keys (after ':', comma-separated):
  vit=L/16       encoder size: L/16 (the paper), B/16, S/16, Ti/16, H/14
  mask=0.75      mask ratio (the reference code uses 0.9)
  fusion=easy    easy | weighted_sum | attention | glu | prior | none
  losses=l1+l2+l3  the enabled loss terms, e.g. l1+l3 for an ablation
  person=box     box (crop of the person box) | second_view (the reference code's behaviour)
  teacher=openai/clip-vit-base-patch16   a hub id or a local directory
"""
import ml_collections

from uniemox_jax import config_utils

ALL_LOSSES = ("l1", "l2", "l3")


def model_config(vit: str, mask: float, fusion: str, losses: str,
                 image_size: int = 224) -> ml_collections.ConfigDict:
  enabled = set(filter(None, losses.split("+")))
  unknown = enabled - set(ALL_LOSSES)
  if unknown:
    raise ValueError(f"config variant losses={losses!r}: unknown terms {sorted(unknown)}")
  return ml_collections.ConfigDict(dict(
      variant=vit,
      image_size=image_size,
      mask_ratio=mask,
      drop_path=0.0,
      # The student tokens are projected into CLIP ViT-B/16's 512-wide embedding space.
      decoder=dict(width=512, depth=8, heads=16),
      fusion=fusion,
      fusion_heads=8,
      norm_pix_loss=False,
      loss_weights={name: 1.0 if name in enabled else 0.0 for name in ALL_LOSSES},
      remat=False,
      scan=False,
      dtype="bfloat16",
      param_dtype="float32",
  ))


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, vit="L/16", mask=0.75, fusion="easy", losses="l1+l2+l3",
                               person="box", teacher="openai/clip-vit-base-patch16")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(arg.vit, arg.mask, arg.fusion, arg.losses)
  config.teacher = dict(name=arg.teacher, tiny=False, normalization="clip", dtype="bfloat16")
  config.data = dict(person_view=arg.person)
  config.batch_size = 4096
  return config

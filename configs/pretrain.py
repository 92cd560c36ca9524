r"""UniEmoX pretraining: the paper's recipe and its ablations (docs/method.md §1-4).

  python -m uniemox_jax.main --config configs/pretrain.py:vit=L/16,data=/data/emoset \
      --workdir WORKDIR

Variant keys (after ':', comma-separated):
  vit=L/16       encoder size: L/16 (the paper), B/16, S/16, Ti/16, H/14
  mask=0.75      mask ratio (the reference code uses 0.9)
  fusion=easy    easy | weighted_sum | attention | glu | prior | none
  losses=l1+l2+l3  the enabled loss terms, e.g. l1+l3 for an ablation
  person=box     box (crop of the person box) | second_view (the reference code's behaviour)
  teacher=openai/clip-vit-base-patch16   a hub id or a local directory
  data=/path/to/emoset   converted shards (python -m uniemox_jax.tools.convert --source emoset)
  epochs=200     total epochs (warmup 40)
  lr=mae         the learning-rate rule at the stated global batch of 4096:
                 mae        base_lr 1.5e-4 (MAE's rule): peak 2.4e-3 (the default)
                 reference  base_lr 1e-3 (the reference code's, tuned for a tiny batch):
                            peak 1.6e-2 at 4096, 6.7x MAE's; use it with a small batch
"""
import ml_collections

from uniemox_jax import config_utils

common = config_utils.sibling(__file__, "common")

ALL_LOSSES = ("l1", "l2", "l3")
# base_lr per rule; the peak is base_lr x global batch / 256.
LR_RULES = {"mae": 1.5e-4, "reference": 1e-3}


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
      # L1's similarity matrix over: global (every row of the batch) | device (each device's
      # rows: the reference's per-GPU L1) | N (groups of N rows)
      l1_group="global",
      loss_weights={name: 1.0 if name in enabled else 0.0 for name in ALL_LOSSES},
      # Blocks as one nn.scan (parameters gain a leading layers axis): the step compiles one
      # block per stack instead of every block. Scanned, each block's backward pass needs the
      # activations the remat policy keeps: dots_no_batch keeps the weight matmuls' outputs and
      # recomputes attention's and the elementwise ops (L/16 at 32 per chip on v5e: 9.0 GiB,
      # below the unrolled program's 9.9; none: 16.9, over the chip's 16; docs/benchmarks.md).
      # remat: none | full | dots | dots_no_batch (every block) | encoder | decoder (full, there)
      remat="dots_no_batch",
      scan=True,
      # auto: cuDNN flash attention on NVIDIA GPUs (bf16), XLA elsewhere | cudnn | xla
      attention="auto",
      attention_pad=0,     # cuDNN's sequence multiple; 0: odd lengths to 64, even ones unpadded
      dtype="bfloat16",
      param_dtype="float32",
  ))


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, vit="L/16", mask=0.75, fusion="easy", losses="l1+l2+l3",
                               person="box", teacher="openai/clip-vit-base-patch16",
                               data="", epochs=200, lr="mae")
  if arg.lr not in LR_RULES:
    raise ValueError(f"config variant lr={arg.lr!r}: choose one of {sorted(LR_RULES)}")
  # EmoSet-118K train + val, converted with --text_embeddings (the test split is never used).
  config = common.runtime("pretrain", data=arg.data, split="train+val", keep_every=10_000,
                          profile_steps=5)
  config.data.person_view = arg.person
  config.model = model_config(arg.vit, arg.mask, arg.fusion, arg.losses)
  # impl: fused (our CLIP image tower on the same weights, fast) | transformers (FlaxCLIPModel)
  config.teacher = dict(name=arg.teacher, tiny=False, normalization="clip", dtype="bfloat16",
                        impl="fused", attention="auto", scan=True)
  config.batch_size = 4096                 # global: the recipe's, stated (see lr=)
  config.total_epochs = arg.epochs         # the released checkpoints: 100 and 200
  config.optim = dict(base_lr=LR_RULES[arg.lr], b1=0.9, b2=0.95, weight_decay=0.05,
                      warmup_epochs=40, warmup_steps=0, min_lr=0.0, grad_clip=0.0,
                      accum_steps=1)   # > 1: micro-batches per step, gradients averaged
  # Evaluators run on the parameters every `period` steps (0: only from the evaluation
  # command, python -m uniemox_jax.evaluate); data "" reads the run's data. Representation
  # monitors, not benchmark numbers: a linear probe fitted on EmoSet's val split and reported
  # on its test split, zero-shot on the test split, a reconstruction grid.
  config.evals = dict(
      zero_shot=dict(type="zero_shot", period=1000, data="", split="test"),
      linear_probe=dict(type="linear_probe", period=1000, data="", train_split="val",
                        val_split="", split="test", steps=500, lr=1e-2, weight_decays=(1e-4,)),
      reconstruction=dict(type="reconstruction", period=1000, data="", split="test", num=8),
  )
  return config

r"""Fine-tuning on an emotion benchmark (docs/method.md §5): the paper's recipe.

  python -m uniemox_jax.main --config configs/finetune.py:dataset=emo8,data=/data/emo8,\
init=/ckpt/uniemox-l16/checkpoints --workdir WORKDIR

Variant keys (after ':', comma-separated):
  dataset=emo8    emo8 | fi | emotion6 | ube | heco | caer_s | emoset | emotic
  vit=L/16        the encoder size of the pretrained checkpoint
  data=DIR        the converted dataset (python -m uniemox_jax.tools.convert)
  init=PATH       the pretrained encoder: a checkpoint directory written here (format
                  uniemox_jax: <workdir>/checkpoints or <workdir>/checkpoints/<step>), or a
                  file of another format
  format=uniemox_jax   the importer of `init` (config.init.encoder_format)
  epochs=100      total epochs (warmup 5)
"""
from data_pipelines import catalogue
from uniemox_jax import config_utils

common = config_utils.sibling(__file__, "common")

# Each benchmark's classes, training-set size and global batch come from the dataset catalogue
# (data_pipelines/catalogue.py): the batch gives every benchmark at least 20 optimizer steps per
# epoch (the lr follows by base_lr x batch / 256; tests/test_main.py checks the 20).
DATASETS = {d.name: dict(num_classes=d.num_classes, multi_label=d.multi_label,
                         train_images=d.train_images, batch_size=d.batch_size)
            for d in catalogue.CATALOGUE.values()}
MIN_STEPS_PER_EPOCH = 20


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, dataset="emo8", vit="L/16", data="", init="",
                               format="uniemox_jax", epochs=100)
  if arg.dataset not in DATASETS:
    raise ValueError(f"config variant dataset={arg.dataset!r}: choose one of "
                     f"{sorted(DATASETS)}")
  spec = DATASETS[arg.dataset]
  config = common.runtime("finetune", data=arg.data, split="train", checkpoint_keep=2,
                          encoder=arg.init, encoder_format=arg.format)
  config.data.eval_split = "val"
  config.dataset = arg.dataset
  config.num_classes = spec["num_classes"]       # checked against the data's class list
  config.multi_label = spec["multi_label"]
  # pos_embed "learned": the position table is trained from the fixed sin-cos one, as in MAE's
  # fine-tuning (and as the imported timm / fine-tuned MAE / UniEmoX ViTs carry it).
  # Scanned blocks with dots_no_batch remat, as in pretraining (L/16 at 32 per chip on v5e:
  # 9.7 GiB and an 82 s compile, against 9.8 GiB and 1091 s (a busier host) unrolled; scanned
  # without remat it needs 19.3 GiB and is refused).
  config.model = dict(variant=arg.vit, image_size=224, drop_path=0.2, pos_embed="learned",
                      remat="dots_no_batch", scan=True, dtype="bfloat16", param_dtype="float32",
                      attention="auto", attention_pad=0,
                      # avg: fc_norm over the patch tokens' mean (the method); token: the CLS
                      # token after the final norm (timm's default ViTs; an imported one
                      # records it and evaluation follows the checkpoint).
                      pool="avg",
                      # A transformers vision backbone instead of our ViT (the reference's
                      # baselines): a hub id or folder, e.g. microsoft/resnet-50; its own
                      # weights start the run (uniemox_jax/models/hf_backbone.py).
                      backbone="")
  # Host: RandAugment m9 mstd0.5; device: random erasing, mixup/cutmix, label smoothing.
  config.augment = dict(rand_augment=True, erase_prob=0.25, mixup_alpha=0.8,
                        cutmix_alpha=1.0, switch_prob=0.5, mix_prob=1.0,
                        label_smoothing=0.0 if spec["multi_label"] else 0.1)
  config.batch_size = spec["batch_size"]   # global: the table above
  config.total_epochs = arg.epochs
  config.optim = dict(base_lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.05, warmup_epochs=5,
                      warmup_steps=0, min_lr=1e-6, grad_clip=0.0, accum_steps=1,
                      layer_decay=0.75)    # lr x 0.75 ** (depth + 1 - layer): MAE's LLRD
  config.eval_every_epochs = 1             # validation; the best state goes to WORKDIR/best
  config.eval_every_steps = 0              # > 0 overrides eval_every_epochs
  config.test_split = "test"               # evaluated with the best state at the end ("": no)
  # Evaluators (uniemox_jax.evaluators): period 0 runs them only from the evaluation command
  # (python -m uniemox_jax.evaluate); a period > 0 also runs them during training.
  # explain: heatmaps of fixed images (python -m uniemox_jax.evaluate ... --evals explain).
  config.evals = dict(classification=dict(type="classification", period=0, data="",
                                          split="test"),
                      explain=dict(type="explain", period=0, data="", split="test", num=8,
                                   methods="rollout,gradcam,grad_x_input", target="predicted",
                                   head_fusion="mean", discard_ratio=0.0))
  return config

r"""PyTorch checkpoints (MAE, timm / fine-tuned ViTs, the authors' UniEmoX) -> an orbax
checkpoint of this codebase. The kinds, the layouts and what is checked:
`uniemox_jax/torch_import.py`.

  python -m uniemox_jax.tools.import_torch --src mae_pretrain_vit_large.pth --kind mae \
      --vit L/16 --out /ckpt/mae-l16
"""
from __future__ import annotations

import argparse

import numpy as np

from data_pipelines import storage
from uniemox_jax import errors
from uniemox_jax import torch_import


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=torch_import.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="the .pth (or .safetensors) file")
  p.add_argument("--kind", required=True, choices=torch_import.KINDS)
  p.add_argument("--out", required=True, help="the checkpoint directory to write")
  p.add_argument("--vit", default=None, help="ViT size, e.g. L/16 (default: from the file)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--pos_embed", choices=["sincos", "learned"], default=None,
                 help="the target model's position table (default: sincos for pretraining "
                      "kinds, learned for classifiers)")
  p.add_argument("--decoder_heads", type=int, default=16)
  p.add_argument("--class_names", default="",
                 help="comma-separated class names of a classifier, recorded for evaluation")
  args = p.parse_args(argv)
  sd = torch_import.load_state_dict(args.src)
  variant = args.vit or torch_import.variant_of(sd, args.src)
  params, report = torch_import.convert(sd, args.kind, variant, args.image_size,
                                        source=args.src, pos_embed=args.pos_embed,
                                        decoder_heads=args.decoder_heads)
  report.check()
  meta = {"task": "import", "kind": args.kind, "source": storage.absolute(args.src),
          "variant": variant}
  names = [n for n in args.class_names.split(",") if n]
  if names:
    classes = params.get("head", {}).get("kernel", np.zeros((0, 0))).shape[-1]
    if len(names) != classes:
      raise ValueError(f"--class_names gives {len(names)} names, the head has {classes} "
                       "classes")
    meta["class_names"] = names
  if "head" in params:
    # How the classifier pools: fc_norm after an average (MAE, the method) or the CLS token
    # after the final norm (timm's default); evaluation and prediction read it.
    meta["pool"] = "avg" if "fc_norm" in params else "token"
  step_dir = torch_import.write_checkpoint(params, args.out, meta)
  print(report.summary())
  print(f"wrote {step_dir}")
  return 0


if __name__ == "__main__":
  errors.run_command(main)

#!/usr/bin/env bash
# The paper's table: fine-tune one pretrained checkpoint on benchmarks x seeds, each run in
# ROOT/<benchmark>/seed_<seed> (resumable), locally one after another or, with --slurm, as a
# SLURM job array (one task per run); then the table (Markdown, CSV, PNG) of what finished.
#   Usage: launch/finetune_suite.sh --pretrained CKPT --benchmarks NAME=DATA,... --seeds 0,1,2 \
#              --root ROOT [--variant vit=L/16] [--slurm] [--config.field=value ...]
#   e.g.   launch/finetune_suite.sh --pretrained /ckpt/uniemox-l16/checkpoints \
#              --benchmarks emo8=/data/emo8,fi=/data/fi --seeds 0,1,2 --root /ckpt/suite
#          python -m uniemox_jax.results /ckpt/suite
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n '2,9p' "$0"; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)     # relative paths stay relative to where you are
PY=${PYTHON:-$( [[ -x $repo/.venv/bin/python ]] && echo "$repo/.venv/bin/python" || echo python3 )}
exec "$PY" -m uniemox_jax.suite "$@"

#!/usr/bin/env bash
# Evaluate a checkpoint on one split with the evaluators of its config (config.evals; a
# fine-tuning config: top-1/top-3, per-class accuracy, macro F1, confusion matrix, or mAP);
# the reports go to WORKDIR/evaluations/<checkpoint dir>-<step>/<evaluator>-<dataset>-<split>-<hash>/
# (or under --out_dir), never into a training run's own <evaluator>/ folders.
#   Usage: launch/evaluate.sh CONFIG CHECKPOINT [SPLIT] [--evals a,b] [--out_dir OUT] [--config.field=value ...]
#   e.g.   launch/evaluate.sh configs/finetune.py:dataset=emo8,data=/data/emo8 /ckpt/emo8/best test
# On a pod or cluster, start it on every process as the training launchers do; JAX joins them.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n '2,8p' "$0"; exit 2; }
config=$1 checkpoint=$2
shift 2
split=test
if [[ $# -ge 1 && $1 != --* ]]; then split=$1; shift; fi
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m uniemox_jax.evaluate --config "$config" --checkpoint "$checkpoint" \
  --split "$split" "$@"

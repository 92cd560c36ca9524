#!/usr/bin/env bash
# Local run on this machine's devices (CPU, or every local GPU/TPU).
#   Needs: `make demo` run once (it sets up .venv), or `pip install -e .` in your environment.
#   Usage: launch/local.sh CONFIG WORKDIR [--config.field=value ...]
#   e.g.   launch/local.sh configs/pretrain.py:vit=B/16,data=/data/emoset /ckpt/b16 \
#              --config.batch_size=256
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n '2,6p' "$0"; exit 2; }
config=$1 workdir=$2
shift 2
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m uniemox_jax.main --config "$config" --workdir "$workdir" "$@"

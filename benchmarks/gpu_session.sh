#!/usr/bin/env bash
# One lent-GPU session, prepared and tried on a CPU first (SMOKE=1: tiny sizes, XLA only):
# checks, then timings, the most important first, each bounded so that the whole part stays
# inside BUDGET seconds. Part 1: UniEmoX with cuDNN attention (B/16, L/16) beside the naive
# MAE baseline. Part 2: agreement checks, the PyTorch peer, the XLA-attention rows, a larger
# batch.
#   BUDGET=300 bash benchmarks/gpu_session.sh 1; BUDGET=240 bash benchmarks/gpu_session.sh 2
# Everything printed is also appended to $OUT/log.txt. Wheels the device lacks
# (ml_collections; transformers 4.x for the FlaxCLIPModel comparisons) travel in .whl/ and go
# to /tmp/site for the JAX scripts only; the PyTorch peer uses the machine's own transformers.
set -u
part=${1:-1}
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 TRANSFORMERS_VERBOSITY=error
deadline=$((SECONDS + ${BUDGET:-300}))
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "wheel install failed"
fi
JAXPATH=/tmp/site:$PWD
if [ "${SMOKE:-0}" = 1 ]; then
  B=mu/16; L=mu/16; SIZE="--batch 2 --steps 1 --windows 1"; BIG="--batch 4 --steps 1 --windows 1"
  CUDNN=xla; CHECK="--cpu_ok --small"; PEER="--batch 2 --steps 1 --windows 1"
else
  B=B/16; L=L/16; SIZE="--batch 256"; BIG="--batch 512"; CUDNN=cudnn; CHECK=""; PEER=""
fi

step() {   # step LIMIT_S CMD...: runs CMD unless the budget is spent; caps it at what is left
  local limit=$1; shift
  local left=$((deadline - SECONDS))
  if (( left < 25 )); then echo "SKIPPED (budget spent): $*" | tee -a "$OUT/log.txt"; return; fi
  (( limit > left )) && limit=$left
  echo "### $* (limit ${limit}s, t=${SECONDS}s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" 2>&1 | grep -v -e "Warning" -e "warn(" -e "deprecated" -e "^$" \
    | tee -a "$OUT/log.txt"
  echo "### exit ${PIPESTATUS[0]} at t=${SECONDS}s" | tee -a "$OUT/log.txt"
}

if [ "$part" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | tee -a "$OUT/log.txt"
  PYTHONPATH=$JAXPATH python3 -c "import jax, flax, optax, transformers; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'transformers', transformers.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/log.txt"
  # The UniEmoX step's GPU compile outlasted 70-150 s limits in the first session (MAE's took
  # 14-43 s): time it alone first, then L/16 scanned (one block compiled, not 24).
  step 200 env PYTHONPATH=$JAXPATH python3 benchmarks/train_step.py --vit $B $SIZE \
    --attention $CUDNN --models uniemox
  step 130 env PYTHONPATH=$JAXPATH python3 benchmarks/train_step.py --vit $L $SIZE \
    --attention $CUDNN --models uniemox --scan
else
  step 100 env PYTHONPATH=$JAXPATH python3 benchmarks/attention_check.py $CHECK
  step 70 env PYTHONPATH=$PWD python3 benchmarks/torch_peer.py --vit $B,$L $PEER
  step 150 env PYTHONPATH=$JAXPATH python3 benchmarks/train_step.py --vit $B,$L $SIZE \
    --attention xla --no_baseline --models uniemox --scan
  step 120 env PYTHONPATH=$JAXPATH python3 benchmarks/train_step.py --vit $B,$L $BIG \
    --attention $CUDNN --no_baseline --models uniemox --scan
fi
echo "### part $part done at t=${SECONDS}s" | tee -a "$OUT/log.txt"

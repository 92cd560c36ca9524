#!/usr/bin/env bash
# TPU pod slice: start the same command on every worker; JAX finds the other hosts itself
# (jax.distributed.initialize() with no arguments on Cloud TPU).
#   Needs: a TPU VM slice, this repository on every worker, `pip install -e . "jax[tpu]"` run
#          on all workers, and the data and WORKDIR in a bucket the VMs' service account may
#          read and write (application default credentials; no key files).
#   Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]
#   e.g.   launch/tpu_pod.sh my-v4-64 us-central2-b \
#              configs/pretrain.py:vit=L/16,data=gs://bucket/emoset gs://bucket/ckpt/l16
#   WORKDIR must be shared by all workers (gs://): every host writes its checkpoint shards;
#   each host caches the shards it reads in $UNIEMOX_CACHE_DIR (default ~/.cache/uniemox_jax).
#   Preemption (exit 75 on a worker, after the state is saved) restarts the command, up to
#   MAX_RESTARTS times (default 20) after RESTART_DELAY seconds (default 30); any other
#   failure stops.
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n '2,12p' "$0"; exit 2; }
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${REPO_DIR:-\$HOME/uniemox-jax}
PREEMPTED=75     # uniemox_jax.errors.EXIT_PREEMPTED
for attempt in $(seq 0 "${MAX_RESTARTS:-20}"); do
  set +e
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
    "cd $repo && python3 -m uniemox_jax.main --config '$config' --workdir '$workdir' $*"
  code=$?
  set -e
  [[ $code -eq $PREEMPTED ]] || exit $code
  echo "preempted (attempt $attempt): restarting to resume from $workdir" >&2
  sleep "${RESTART_DELAY:-30}"
done
exit $PREEMPTED

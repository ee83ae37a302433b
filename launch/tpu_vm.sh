#!/usr/bin/env bash
# Cloud TPU VM launcher for resnet-jax: create, install, train, follow logs, tear down.
#
#   export PROJECT=my-project ZONE=us-central2-b NAME=rn50 TYPE=v4-8 BUCKET=gs://my-bucket
#   launch/tpu_vm.sh create            # queued resource; SPOT=1 for a spot slice
#   launch/tpu_vm.sh install           # copy this checkout to every worker, pip install it
#   launch/tpu_vm.sh train configs/imagenet_resnet.py:resnet50-modern   # on all workers
#   launch/tpu_vm.sh logs              # follow worker 0's log
#   launch/tpu_vm.sh delete
#
# TYPE: v4-8, v5litepod-8 (v5e-8), v6e-8 (single host) or v4-32 and up (pod slices:
# one process per host; jax.distributed.initialize() finds the others by itself).
# The workdir and the tfds data live in $BUCKET, so every worker sees the same files and
# a preempted spot slice resumes from the newest checkpoint when `train` is re-run.
# Runtime versions: tpu-ubuntu2204-base (v4/v5e), v2-alpha-tpuv6e (v6e).
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${NAME:?set NAME}" "${TYPE:=v4-8}" "${BUCKET:?set BUCKET}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
RUN=${RUN:-$(date +%Y%m%d-%H%M%S)}
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" --project "$PROJECT" --zone "$ZONE" --worker=all --command "$1"; }

case "${1:-}" in
  create)
    gcloud compute tpus queued-resources create "$NAME" --project "$PROJECT" --zone "$ZONE" \
      --node-id "$NAME" --accelerator-type "$TYPE" --runtime-version "$RUNTIME" ${SPOT:+--spot}
    echo "waiting for $NAME to become ACTIVE ..."
    until gcloud compute tpus queued-resources describe "$NAME" --project "$PROJECT" --zone "$ZONE" \
        --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done ;;
  install)  # copies this checkout (git HEAD) to every worker and installs it with jax[tpu]
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o /tmp/resnet-jax.tar.gz HEAD
    gcloud compute tpus tpu-vm scp /tmp/resnet-jax.tar.gz "$NAME": --project "$PROJECT" --zone "$ZONE" --worker=all
    ssh_all "rm -rf resnet-jax && mkdir resnet-jax && tar -xzf resnet-jax.tar.gz -C resnet-jax && \
      python3 -m pip install -U pip && cd resnet-jax && python3 -m pip install -e . 'jax[tpu]'" ;;
  train)
    CONFIG=${2:?give a config, e.g. configs/imagenet_resnet.py:resnet50-modern}; shift 2
    ssh_all "cd resnet-jax && nohup resnet-jax train --config $CONFIG --workdir $BUCKET/runs/$NAME \
      --config.data.data_dir=$BUCKET/tfds $* > ~/train-$RUN.log 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$NAME" --project "$PROJECT" --zone "$ZONE" --worker=0 \
      --command "tail -F \$(ls -t ~/train-*.log | head -1)" ;;
  delete)
    gcloud compute tpus queued-resources delete "$NAME" --project "$PROJECT" --zone "$ZONE" --force --quiet ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac

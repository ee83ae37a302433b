#!/usr/bin/env bash
# Cloud TPU VM launcher for resnet-jax: create, install, train, follow logs, tear down.
#
#   export PROJECT=my-project ZONE=us-central2-b NAME=rn50 TYPE=v4-8 BUCKET=gs://my-bucket
#   launch/tpu_vm.sh create            # queued resource; SPOT=1 for a spot slice
#   launch/tpu_vm.sh install           # copy this checkout to every worker, pip install it
#   launch/tpu_vm.sh train configs/imagenet_resnet.py:resnet50-modern [--config.x=y ...]  # all workers
#   launch/tpu_vm.sh logs              # follow worker 0's log
#   launch/tpu_vm.sh status            # the queued resource's state
#   launch/tpu_vm.sh delete
#
# TYPE: v4-8, v5litepod-8 (v5e-8), v6e-8 (single host) or v4-32 and up (pod slices:
# one process per host; jax.distributed.initialize() finds the others by itself).
# RUNTIME defaults to the TPU software version for TYPE's generation (v6e: v2-alpha-tpuv6e,
# v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v4: tpu-ubuntu2204-base).
# The workdir and the tfds data live in $BUCKET, so every worker sees the same files. A
# spot slice that was preempted (queued resource SUSPENDED) is resumed by running create,
# install and train again: create deletes the suspended request first, and train resumes
# from the newest checkpoint in the bucket.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${NAME:?set NAME}" "${TYPE:=v4-8}" "${BUCKET:?set BUCKET}"
case "$TYPE" in
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME=${RUNTIME:-$default_runtime}
RUN=${RUN:-$(date +%Y%m%d-%H%M%S)}
where=(--project "$PROJECT" --zone "$ZONE")
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" "${where[@]}" --worker=all --command "$1"; }
state() { gcloud compute tpus queued-resources describe "$NAME" "${where[@]}" --format='value(state.state)' 2>/dev/null || true; }

case "${1:-}" in
  create)
    s=$(state)
    case "$s" in
      ACTIVE) echo "$NAME is already ACTIVE"; exit 0 ;;
      SUSPENDED | SUSPENDING | FAILED)
        echo "$NAME was preempted or failed ($s): deleting the old request, then creating it again"
        gcloud compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet ;;
    esac
    gcloud compute tpus queued-resources create "$NAME" "${where[@]}" \
      --node-id "$NAME" --accelerator-type "$TYPE" --runtime-version "$RUNTIME" ${SPOT:+--spot}
    echo "waiting for $NAME to become ACTIVE ..."
    while true; do
      s=$(state)
      case "$s" in
        ACTIVE) echo "$NAME is ACTIVE"; break ;;
        FAILED | SUSPENDED) echo "$NAME is $s; see: gcloud compute tpus queued-resources describe $NAME" >&2; exit 1 ;;
      esac
      sleep 30
    done ;;
  install)  # copies this checkout (git HEAD) to every worker and installs it with jax[tpu]
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o /tmp/resnet-jax.tar.gz HEAD
    gcloud compute tpus tpu-vm scp /tmp/resnet-jax.tar.gz "$NAME": "${where[@]}" --worker=all
    ssh_all "rm -rf resnet-jax && mkdir resnet-jax && tar -xzf resnet-jax.tar.gz -C resnet-jax && \
      python3 -m pip install -U pip && cd resnet-jax && python3 -m pip install -e . 'jax[tpu]'" ;;
  train)  # extra arguments are passed to `resnet-jax train` (no spaces inside one argument)
    CONFIG=${2:?give a config, e.g. configs/imagenet_resnet.py:resnet50-modern}; shift 2
    ssh_all "cd resnet-jax && nohup resnet-jax train --config $CONFIG --workdir $BUCKET/runs/$NAME \
      --config.data.data_dir=$BUCKET/tfds $* > ~/train-$RUN.log 2>&1 &"
    echo "started on every worker; follow with: launch/tpu_vm.sh logs" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$NAME" "${where[@]}" --worker=0 \
      --command "tail -F \$(ls -t ~/train-*.log | head -1)" ;;
  status) echo "${NAME}: $(state)" ;;
  delete)
    gcloud compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac

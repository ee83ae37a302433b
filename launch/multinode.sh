#!/usr/bin/env bash
# Multi-node without a scheduler: run this on every node with its own PROCESS_ID.
#
#   # node 0 (10.0.0.1) and node 1:
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/multinode.sh configs/imagenet_resnet.py:resnet50-modern /shared/r50
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=1 launch/multinode.sh configs/imagenet_resnet.py:resnet50-modern /shared/r50
#
# Each process uses all local GPUs; the coordinator port must be reachable from all nodes.
# RESNET_JAX_HEARTBEAT_TIMEOUT (s, default 100) bounds how long survivors wait for a dead peer.
set -euo pipefail
: "${COORDINATOR:?host:port of process 0}" "${NUM_PROCESSES:?}" "${PROCESS_ID:?}"
CONFIG=${1:?config}; WORKDIR=${2:?workdir on a shared filesystem}; shift 2
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$PROCESS_ID
exec resnet-jax train --config "$CONFIG" --workdir "$WORKDIR" "$@"

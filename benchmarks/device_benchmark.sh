#!/usr/bin/env bash
# One device call: our benchmark for the README table next to the torchvision peer.
# Run on a lent H100/H200 from the repository root (jax, torch, torchvision are in its
# image; ml-collections must be carried as a wheel, see /work/.library/device/README.md).
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=true
run() { echo "== $*"; python3 -m resnet_jax.cli benchmark --json "$@" | tee -a "$OUT/ours.jsonl"; }
run --model resnet50 --batch-size 256 --image-size 224 --dtype bfloat16 --steps 100
run --model resnet18 --batch-size 256 --image-size 224 --dtype bfloat16 --steps 100
run --model resnet101 --batch-size 256 --image-size 224 --dtype bfloat16 --steps 100
run --model resnetrs50 --batch-size 256 --image-size 160 --dtype bfloat16 --steps 100
PEER=${PEER:-../shared/bench/peer_torchvision.py}
[ -f "$PEER" ] || PEER=shared/bench/peer_torchvision.py
for model in resnet50 resnet18 resnet101; do
  python3 "$PEER" --model "$model" --batch-size 256 | tee -a "$OUT/peer.jsonl"
done

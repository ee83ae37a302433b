#!/usr/bin/env bash
# Run HERE (not on the device), from the repository root, before benchmarks/device_benchmark.sh:
# puts what the device image lacks into .whl/ (in .gitignore), to carry with the device call.
#   - ml-collections (pure Python; the image has its needs: absl-py, PyYAML)
#   - the torchvision peer, ../shared/bench/peer_torchvision.py (../shared does not travel)
# Then: device run, carry [".whl"], command "bash benchmarks/device_benchmark.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl "ml-collections==$(python3 -c 'import importlib.metadata as m; print(m.version("ml-collections"))')"
cp ../shared/bench/peer_torchvision.py .whl/
ls -la .whl

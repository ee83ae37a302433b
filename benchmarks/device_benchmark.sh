#!/usr/bin/env bash
# The device call: installs what the device image lacks from .whl/ (benchmarks/prepare_device.sh, run
# here first), then runs benchmarks/device_benchmark.py with these arguments: issue 6's measurements
# in priority order within one call's time (--budget-s, default 540 s). Its docstring has the plan:
#   here:       bash benchmarks/prepare_device.sh
#   on device:  run(command="bash benchmarks/device_benchmark.sh", carry=[".whl"], timeout_s=600)
#   --list prints the jobs and their estimates; the summary's last line is the next call's --only.
set -uo pipefail
export OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec python3 benchmarks/device_benchmark.py "$@"

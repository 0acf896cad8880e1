#!/usr/bin/env bash
# The prepared GPU run in one command: python -m benchmarks.gpu.run under an outer timeout, output teed to OUT/run.log.
#
#   bash benchmarks/gpu/run.sh OUT [options of python -m benchmarks.gpu.run, e.g. --tiny]
#
# PYTHON (default python3) runs it; PD_GPU_TIMEOUT_S (default 585) is the outer limit in seconds, above the
# script's own --total-s (560), so the script normally ends by itself with its results written.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu/run.sh OUT_DIR [options of python -m benchmarks.gpu.run]" >&2
  exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
shift
cd "$(dirname "$0")/../.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout --kill-after=10 "${PD_GPU_TIMEOUT_S:-585}" "${PYTHON:-python3}" -m benchmarks.gpu.run --out "$out" "$@" 2>&1 \
  | tee "$out/run.log"
exit "${PIPESTATUS[0]}"

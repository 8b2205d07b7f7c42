#!/usr/bin/env bash
# The device-machine run of bench/gpu_check.py (see its docstring). From the repo root:
#     bash bench/gpu_check.sh [extra gpu_check.py options]
# Needs the wheels of /work/shared/gpu/wheels copied into .whl/ (or WHEELS=/path/to/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
echo "[gpu_check.sh] wheels installed into /tmp/site in $(( $(date +%s) - started ))s"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py --out "${OUT:-bench-out/gpu}" "$@"

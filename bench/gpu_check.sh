#!/usr/bin/env bash
# The device-machine run of bench/gpu_check.py (its docstring says what it measures). From the repo root:
#     BENCH_COMMIT=<sha>[-dirty] bash bench/gpu_check.sh [gpu_check.py options, e.g. --quick --budget 430]
# Needs the wheels of /work/shared/gpu/wheels (open_clip, webdataset, zarr, regex, ...; see its README)
# copied into .whl/ (or WHEELS=/path/to/wheels). They install beside the image's own torch, without
# network and without dependencies, into a scratch site folder put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-$(mktemp -d)}"
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
echo "[gpu_check.sh] wheels installed into $SITE in $(( $(date +%s) - started ))s"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c "import regex, open_clip, webdataset, zarr" || { echo "[gpu_check.sh] a wheel is missing from $WHEELS"; exit 2; }
exec python3 bench/gpu_check.py --out "${OUT:-bench-out/gpu}" "$@"

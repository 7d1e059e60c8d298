#!/usr/bin/env bash
# On the GPU machine (its own python3: torch 2.11 + CUDA 13, no internet): install the wheels that
# scripts/gpu_wheels.sh put in .whl/ into /tmp/site, put that and this checkout on PYTHONPATH, and run
# scripts/gpu_check.py with its JSON and log under $OUT. Arguments go to gpu_check.py (e.g. --dry-run).
#
#   OUT=/tmp/gpu-out scripts/gpu_check.sh [--dry-run]          (PYTHON=python3, SITE=/tmp/site by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu-out}
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: no wheels in .whl/; run scripts/gpu_wheels.sh first" >&2; exit 2; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The serving stage starts `clip-hpc serve` from the interpreter's bin/, where an installed package's console
# script would be; with the package on PYTHONPATH instead, a three-line launcher stands in for it.
EXE=$("$PYTHON" -c 'import sys; print(sys.executable)')
LAUNCHER="$(dirname "$EXE")/clip-hpc"
if [ ! -e "$LAUNCHER" ]; then
  { printf '#!%s\nimport sys\nfrom clip_hpc.cli import main\nsys.exit(main())\n' "$EXE" > "$LAUNCHER" &&
    chmod +x "$LAUNCHER"; } || echo "gpu_check.sh: cannot write $LAUNCHER; the serve stage will fail" >&2
fi
mkdir -p "$OUT"
"$PYTHON" -c 'import clip_hpc, open_clip, faiss, fastapi, uvicorn, torch, torchvision; print("imports ok:",
  "torch", torch.__version__, "torchvision", torchvision.__version__, "faiss", faiss.__version__,
  "open_clip", open_clip.__version__, "fastapi", fastapi.__version__)'
"$PYTHON" scripts/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"

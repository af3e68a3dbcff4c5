#!/usr/bin/env bash
# Runs the speed benchmarks on a GPU (--device cuda), each under `timeout`, 420 s in all
# (inside 8 minutes), and prints their outputs; with OUT set, each one's log is also
# written to $OUT/<name>.log. Exits quietly (0) when there is no GPU (no nvidia-smi).
# Needs torch, torchvision and lightning; the repository is put on PYTHONPATH, so no install.
# Run from anywhere:  bash benchmarks/gpu.sh [python]
set -u
PY="${1:-${PYTHON:-python}}"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found, no GPU here; nothing run"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# name|seconds|command  (420 s in all, leaving room for start-up inside 8 minutes)
CHECKS=(
    "projection|110|$PY benchmarks/projection.py --device cuda --repeats 3"
    "scaling|60|$PY benchmarks/scaling.py --device cuda --repeats 2"
    "overhead|160|$PY benchmarks/overhead.py --device cuda --max-steps 500 --every-n-train-steps 250 --repeats 1"
    "inference|90|$PY benchmarks/inference.py --device cuda --batch-sizes 1 16 64 --repeats 20"
)
status=0
for check in "${CHECKS[@]}"; do
    IFS='|' read -r name seconds cmd <<<"$check"
    log="${OUT:-/tmp}/$name.log"
    echo "=== $name (timeout ${seconds}s): $cmd"
    start=$SECONDS
    timeout --kill-after=10 "$seconds" $cmd >"$log" 2>&1
    rc=$?
    grep -v -i "warning\|warn(\|litlogger\|💡" "$log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
done
exit "$status"

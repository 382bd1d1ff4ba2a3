#!/usr/bin/env bash
# One-shot GPU check for fastfeed: run on a CUDA machine from anywhere in the repo.
#
#   bash benchmarks/gpu_check.sh            # logs and JSON go to $OUT, else ./gpu_out
#
# Steps (each one's exit status is recorded; a failing step never stops the next):
#   1. environment: nvidia-smi, python, torch, CUDA
#   2. the CUDA tests:            python -m pytest -m cuda -v
#   3. the staging benchmark:     benchmarks/gpu_staging.py (table + JSON)
#   4. the whole suite, -x, if enough of the time budget is left (GPU_CHECK_SKIP_SUITE=1: never)
# Total runtime stays under 8 minutes: every step runs under `timeout`.
# At most 8 files are written to $OUT (the device tool brings back no more).

set -u

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET_S=450 # the whole script, seconds (under 8 minutes with start-up slack)
START=$SECONDS

note() { echo "$*" | tee -a "$SUMMARY"; }

# Packages the machine lacks (lmdb) travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        note "wheels: installed $(ls .whl | tr '\n' ' ')"
    else
        note "wheels: install FAILED (continuing; tests that need lmdb will fail)"
    fi
fi
# Import fastfeed from this checkout (no build step: works offline).
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

declare -A RC
run_step() { # name timeout_s logfile command...
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    note ""
    note "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    RC[$name]=$rc
    tail -n 40 "$log"
    note "== $name: exit $rc after $((SECONDS - t0)) s (log: $log)"
}

left() { echo $((BUDGET_S - (SECONDS - START))); }

# 1. environment
{
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    echo
    "$PY" - <<'EOF'
import os, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "count", torch.cuda.device_count())
print("cpus", os.cpu_count())
print("storage use count:", hasattr(torch._C, "_storage_Use_Count"))
EOF
} 2>&1 | tee -a "$SUMMARY"
RC[environment]=${PIPESTATUS[0]}

# 2. CUDA tests
run_step cuda_tests 150 "$OUT_DIR/pytest_cuda.log" \
    "$PY" -m pytest -m cuda -v -p no:cacheprovider --timeout 120 -o addopts="-ra" \
    --continue-on-collection-errors

# 3. staging benchmark
run_step gpu_staging 200 "$OUT_DIR/gpu_staging.log" \
    "$PY" benchmarks/gpu_staging.py --out "$OUT_DIR/gpu_staging.json"

# 4. the whole suite, if time allows
REMAIN=$(left)
if [ -n "${GPU_CHECK_SKIP_SUITE:-}" ]; then
    note "== full_suite: skipped (GPU_CHECK_SKIP_SUITE is set)"
    RC[full_suite]=skipped
elif [ "$REMAIN" -gt 60 ]; then
    run_step full_suite "$((REMAIN - 15))" "$OUT_DIR/pytest_all.log" \
        "$PY" -m pytest -x -q -p no:cacheprovider --timeout 120 -o addopts="-ra"
else
    note "== full_suite: skipped, only ${REMAIN}s of the budget left"
    RC[full_suite]=skipped
fi

note ""
note "== summary ($((SECONDS - START)) s)"
FAILED=0
for name in environment cuda_tests gpu_staging full_suite; do
    note "$(printf '%-12s %s' "$name" "${RC[$name]:-not run}")"
    case "${RC[$name]:-x}" in
    0 | skipped) ;;
    *) FAILED=1 ;;
    esac
done
exit $FAILED

#!/usr/bin/env bash
# Round-2 GPU check, one call: CUDA tests, the registered shared ring's H2D rate, the
# 16-core processes x threads sweep and the noisy-neighbour step inflation.
#   bash benchmarks/gpu_round2.sh        # logs and JSON go to $OUT (else ./gpu_out)
# Every step runs under `timeout`; a failing step never stops the next. <= 8 files in $OUT.
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
S="$OUT_DIR/summary.txt"
: >"$S"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
note() { echo "$*" | tee -a "$S"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
step() { # name limit log cmd...
    local name=$1 limit=$2 log=$3 t0=$SECONDS
    shift 3
    note "== $name (limit ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    tail -n 25 "$log" | tee -a "$S"
    note "== $name: exit $rc after $((SECONDS - t0)) s"
}
{ nvidia-smi -L; nproc; "$PY" -c "import torch;print(torch.__version__, torch.version.cuda)"; } 2>&1 | tee -a "$S"
step cuda-tests "${T_TESTS:-170}" "$OUT_DIR/tests.log" \
    "$PY" -m pytest -q -x -p no:cacheprovider -m "cuda" tests
step process-tests "${T_PTESTS:-90}" "$OUT_DIR/ptests.log" \
    "$PY" -m pytest -q -p no:cacheprovider tests/workers tests/pipeline
step shared-ring "${T_RING:-60}" "$OUT_DIR/ring.log" \
    "$PY" benchmarks/gpu_shared_ring.py --out "$OUT_DIR/gpu_shared_ring.json"
step sweep "${T_SWEEP:-200}" "$OUT_DIR/sweep.log" \
    "$PY" benchmarks/loader_vs_torch.py --only jpeg --workers 16 --jpeg-n 1536 --epochs 3 --rate total \
    --processes "${SWEEP:-2:8,4:4,8:2}" --work-dir /tmp/ffbench --out "$OUT_DIR/sweep.json"
step noisy "${T_NOISY:-90}" "$OUT_DIR/noisy.log" \
    "$PY" benchmarks/noisy_neighbour.py --work-dir /tmp/ffnoisy --out "$OUT_DIR/noisy.json"

#!/usr/bin/env bash
# The GPU machine's checks and 16-core benchmarks, in one call: run from anywhere in the repo.
#
#   bash benchmarks/gpu_check.sh                       # the default steps
#   bash benchmarks/gpu_check.sh cuda-tests dropin     # chosen steps, in that order
#
# Steps (each under `timeout`; a failing step never stops the next; its exit status is in
# the summary):
#   env            nvidia-smi, python, torch, CUDA, cores
#   cuda-tests     python -m pytest -m cuda (every CUDA test)
#   process-tests  tests/workers and tests/pipeline (worker processes on a many-core box)
#   staging        benchmarks/gpu_staging.py: pinned ring + side-stream copy rates
#   shared-ring    benchmarks/gpu_shared_ring.py: H2D from the CUDA-registered shared ring
#   sweep          benchmarks/loader_vs_torch.py JPEG rows, processes x threads, 16 cores
#   noisy          benchmarks/noisy_neighbour.py: the loader's cost to a Python-bound step
#   dropin         benchmarks/dataloader_dropin.py: fastfeed.DataLoader vs torch, one run
#   overhead       benchmarks/profiling_overhead.py: the profiler's cost on 3 KB records
#   decode         benchmarks/image_decode.py: CPU and GIL per image, one core
#   suite          the whole test suite, -x
# Default: env cuda-tests dropin overhead decode sweep. Logs, JSON and summary.txt go to
# $OUT (else ./gpu_out); at most 8 files are kept there (the device tool brings back no
# more), so per-step logs are appended to one log.txt.
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
S="$OUT_DIR/summary.txt"
LOG="$OUT_DIR/log.txt"
: >"$S"
: >"$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
note() { echo "$*" | tee -a "$S"; }

# Packages the machine lacks (lmdb, nvImageCodec) travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        note "wheels: install FAILED (continuing; what needs lmdb will fail)"
    fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} # this checkout, no build step

declare -A RC
ORDER=()
step() { # name limit command...
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    note ""
    note "== $name (limit ${limit}s): $*"
    echo "===== $name: $*" >>"$LOG"
    timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/step.log" 2>&1
    local rc=$?
    cat "$OUT_DIR/step.log" >>"$LOG"
    tail -n "${TAIL:-30}" "$OUT_DIR/step.log" | tee -a "$S"
    rm -f "$OUT_DIR/step.log"
    RC[$name]=$rc
    ORDER+=("$name")
    note "== $name: exit $rc after $((SECONDS - t0)) s"
}

run() {
    case $1 in
    env)
        step env 60 bash -c "nvidia-smi -L; nproc; $PY -c 'import torch, platform; \
print(platform.python_version(), torch.__version__, torch.version.cuda, torch.cuda.is_available())'"
        ;;
    cuda-tests)
        step cuda-tests "${T_TESTS:-170}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
        ;;
    process-tests)
        step process-tests "${T_PTESTS:-120}" \
            "$PY" -m pytest -q -p no:cacheprovider tests/workers tests/pipeline
        ;;
    staging)
        step staging "${T_STAGING:-200}" \
            "$PY" benchmarks/gpu_staging.py --out "$OUT_DIR/gpu_staging.json"
        ;;
    shared-ring)
        step shared-ring "${T_RING:-60}" \
            "$PY" benchmarks/gpu_shared_ring.py --out "$OUT_DIR/gpu_shared_ring.json"
        ;;
    sweep)
        step sweep "${T_SWEEP:-200}" "$PY" benchmarks/loader_vs_torch.py --only jpeg \
            --workers 16 --jpeg-n 1536 --epochs 3 --rate total \
            --processes "${SWEEP:-2:8,4:4,8:2}" --work-dir /tmp/ffbench --out "$OUT_DIR/sweep.json"
        ;;
    noisy)
        step noisy "${T_NOISY:-90}" "$PY" benchmarks/noisy_neighbour.py \
            --work-dir /tmp/ffnoisy --out "$OUT_DIR/noisy.json"
        ;;
    dropin)
        step dropin "${T_DROPIN:-150}" "$PY" benchmarks/dataloader_dropin.py \
            --out "$OUT_DIR/dropin.json"
        ;;
    overhead)
        step overhead "${T_OVERHEAD:-150}" "$PY" benchmarks/profiling_overhead.py \
            --json "$OUT_DIR/overhead.json"
        ;;
    decode)
        step decode "${T_DECODE:-150}" "$PY" benchmarks/image_decode.py \
            --json "$OUT_DIR/decode.json"
        ;;
    suite)
        step suite "${T_SUITE:-400}" "$PY" -m pytest -x -q -p no:cacheprovider
        ;;
    *)
        note "unknown step $1"
        RC[$1]=2
        ORDER+=("$1")
        ;;
    esac
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env cuda-tests dropin overhead decode sweep)
for s in "${STEPS[@]}"; do run "$s"; done

note ""
note "== summary"
FAILED=0
for name in "${ORDER[@]}"; do
    note "$(printf '%-14s %s' "$name" "${RC[$name]}")"
    [ "${RC[$name]}" = 0 ] || FAILED=1
done
exit $FAILED

#!/usr/bin/env bash
# One GPU session in one call (about 9.5 minutes): kernel accuracy and timing against cuBLAS,
# whole training steps (graphed and eager), the VAE's epoch speed, the tests that apply to CUDA
# tensors, and, beside the tests, 2-layer VAE runs for the rest of the time.
#
#   OUT=/tmp/hnca-gpu bash benchmarks/gpu_check.sh        # HNCA_DATA_DIR: the MNIST files
#   DRY=1 bash benchmarks/gpu_check.sh                     # on a CPU: every part at tiny sizes
#   SKIP="kernels steps" ...                               # leave parts out
#
# Each part has its own time limit and log in $OUT; a failed part does not stop the others. The
# summary of every part is printed last. TOTAL (seconds, default 570) bounds the whole session.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hnca-gpu}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python3}
TOTAL=${TOTAL:-570}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export HNCA_DATA_DIR=${HNCA_DATA_DIR:-$PWD/.gpu_data}
WORK=$(mktemp -d)
DRY=${DRY:-}
DRYFLAG=${DRY:+--dry-run}

part() {  # part NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.txt (SKIP="names" skips)
  local name=$1 limit=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return;; esac
  echo "== $name (limit ${limit}s, starts at ${SECONDS}s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? at ${SECONDS}s"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  $PY -c "import hnca_kernels, tqdm, numpy; print('hnca_kernels imports')" || { echo "FATAL: import"; exit 1; }
  ls "$HNCA_DATA_DIR"
} 2>&1 | tee "$OUT/env.txt"

# 1. the messages: accuracy against float64, then timing against the FP32 GEMM (builds the CUDA
#    extension in a background thread meanwhile)
part kernels 130 $PY benchmarks/gpu_kernels.py --budget 100 --no-tiles --quick $DRYFLAG

# 2. whole steps: HNCA / REINFORCE / backprop and the VAE's estimators, graphed and eager
part steps 110 $PY benchmarks/gpu_steps.py --budget 85 $DRYFLAG

# 3. the main job's speed: steps per second of full-MNIST 2-layer f-HNCA epochs (graphed), alone
DEVICE=cuda; [ -n "$DRY" ] && DEVICE=cpu
LIMIT=""; [ -n "$DRY" ] && LIMIT="--limit-train 200 --limit-test 20 --hidden 16"
part vae 60 $PY -m hnca_kernels vae --device $DEVICE --layers 2 --estimator hnca_baseline --epochs 3 \
  --test-every 3 --test-samples 100 --no-progress --out "$WORK/speed" $LIMIT

# 4. the tests that apply to CUDA tensors, and beside them the 2-layer VAE cells for the rest of
#    the session (one process each; checkpoints every epoch, so a cut run keeps its epochs)
LEFT=$(( TOTAL - SECONDS - 20 ))
echo "== runs: ${LEFT}s for the 2-layer VAE cells, beside the tests"
for E in hnca_baseline reinforce_loo disarm; do
  timeout "$LEFT" $PY -m hnca_kernels vae --device $DEVICE --layers 2 --estimator $E --seed 0 --epochs 840 \
    --test-every 20 --no-progress --out "$WORK/runs/vae-L2-$E-s0" $LIMIT >"$WORK/run-$E.log" 2>&1 &
done
# the CUDA tests: the backends' conformance (cuda, and triton compiled), their kernels, graphs
TESTS="tests/ops tests/experiments/test_graphs.py"
[ -n "$DRY" ] && TESTS="tests/ops/test_gpu.py tests/experiments/test_graphs.py"
part tests $(( LEFT > 30 ? LEFT : 30 )) $PY -m pytest -q -p no:cacheprovider --maxfail=30 -rfE -m "not slow" $TESTS
wait
tar -czf "$OUT/runs.tar.gz" --exclude checkpoint.pt --exclude .lock -C "$WORK" runs run-hnca_baseline.log run-reinforce_loo.log run-disarm.log 2>/dev/null

echo
echo "======== summary (at ${SECONDS}s)"
cat "$OUT/env.txt"
echo "-- kernels"; sed -n '/^| case/,$p' "$OUT/kernels.txt" | head -60; grep -iE "error|failed" "$OUT/kernels.txt" | head -10
echo "-- steps"; grep -E "ms \(|FAILED|^\|" "$OUT/steps.txt" | head -80
echo "-- vae"; grep -E "^epoch|error" "$OUT/vae.txt"; cat "$WORK/speed/metrics.jsonl" 2>/dev/null | cut -c1-200
echo "-- tests"; tail -40 "$OUT/tests.txt"
echo "-- runs"; for f in "$WORK"/runs/*/metrics.jsonl; do echo "$f: $(wc -l <"$f") epochs; $(tail -1 "$f" | cut -c1-160)"; done

#!/usr/bin/env bash
# The one prepared run on a lent CUDA machine (see GPU.md): versions, the test suite against the
# compiled kernels, kernel microbenchmarks and the engine benchmark on a random-weight model with
# Llama-3-8B layer shapes. Every result lands under $OUT (at most 8 files come back):
#   gpu_check.log, kv_cache-*.csv/png, paged_attention-*.csv/png, engine_peers-*.csv/png
# Budget: under 9 minutes in all; each step has its own time limit and a failing step does not
# stop the next one. Usage: OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
status=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"

step install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
# The same tests as CI, now on the compiled kernels (tests needing the 93 MB embedded model skip).
step tests 240 pytest -q -p no:cacheprovider --ignore=tests/test_aot.py --ignore=tests/test_soak.py
step kv-cache-bench 60 python3 bench/bench_kv_cache.py --out "$OUT"
step paged-attention-bench 150 python3 bench/bench_paged_attention.py --quick --out "$OUT"
step engine-bench 180 cbkernels bench peers --random-llama 4 --prompts 64 --max-new-tokens 64 --quiet --out "$OUT"
echo "gpu_check finished with status $status" | tee -a "$LOG"
exit $status

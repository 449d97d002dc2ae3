#!/usr/bin/env bash
# The one prepared run on a lent CUDA machine (docs/gpu-check.md): versions first, then a gate that
# the kernels compile and run there, the test suite against the compiled kernels, kernel
# microbenchmarks and the engine benchmark on a random-weight model with Llama-3-8B layer shapes.
# Every result lands under $OUT (at most 8 files come back):
#   gpu_check.log, kv_cache-*.csv/png, paged_attention-*.csv/png, engine_peers-*.csv/png
# Budget: under 9 minutes in all; each step has its own time limit. If the kernels do not compile
# for this GPU on its Triton (compile gate) or a compiled launch disagrees with the reference
# (selfcheck), the script stops there, within about a minute, instead of spending the loan on
# failures; after that a failing step does not stop the next one.
# Usage: OUT=/some/dir bash bench/gpu_check.sh
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
  return "$rc"
}

stop() {  # stop REASON: the kernels cannot be checked here; say why and end the run
  echo "gpu_check STOPPED: $1" | tee -a "$LOG"
  echo "Versions are at the top of $LOG; supported ones are in docs/compatibility.md." | tee -a "$LOG"
  exit 1
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import numpy, sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
} 2>&1 | tee "$LOG"

# The gate's arch: compute capability 9.x and newer builds the sm_90 configs, 8.x the sm_80 ones.
ARCH=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(90 if major >= 9 else 80 if major >= 8 else 0)" 2>>"$LOG") \
  || stop "torch sees no CUDA device"
[ "$ARCH" != 0 ] || stop "compute capability below 8.0: the kernels target sm_80 and sm_90"

step install 120 python3 -m pip install -q --no-deps --no-build-isolation -e . || stop "the checkout did not install"
# Every kernel config the launchers pick for this GPU, compiled by this Triton (about 30 s).
step compile-gate 180 python3 -m cbkernels.aot --quiet --arch "$ARCH" \
  || stop "the kernels do not compile for sm_$ARCH with this Triton (table above: compile errors or spills)"
# One compiled launch of each kernel (KV cache and attention, bf16) against the reference.
step selfcheck 120 cbkernels selfcheck --device cuda --dtype bfloat16 \
  || stop "a compiled kernel failed or disagreed with the reference (selfcheck above)"
# Engine with and without asynchronous scheduling (tokens/s, host ms per step) and the cache
# sizing rule on this card (gpu_memory_utilization, profiled activation peak).
step engine-overlap 150 cbkernels bench overlap --random-llama 4 --prompts 128 --max-new-tokens 48 --quiet --out "$OUT"
# The same tests as CI, now on the compiled kernels (tests needing the 93 MB embedded model skip).
step tests 240 pytest -q -p no:cacheprovider --ignore=tests/test_aot.py --ignore=tests/test_soak.py
step kv-cache-bench 60 python3 bench/bench_kv_cache.py --out "$OUT"
step paged-attention-bench 150 python3 bench/bench_paged_attention.py --quick --out "$OUT"
step engine-bench 180 cbkernels bench peers --random-llama 4 --prompts 64 --max-new-tokens 64 --quiet --out "$OUT"
echo "gpu_check finished with status $status" | tee -a "$LOG"
exit $status

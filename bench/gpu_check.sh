#!/usr/bin/env bash
# The one prepared run on a lent CUDA machine (docs/gpu-check.md). Steps in order of value:
#   versions; install; the early stop (compile gate for this arch, one compiled selfcheck);
#   decode + prefill microbenchmarks with their verdict (the attention fast path before/after too); fp8 against bf16 decode (4k-32k);
#   KV-cache copies; the engine (overlap, host work per step, then peers); a sample of the CUDA tests covering
#   every kernel once per dtype; the verdict table.
# Each step has its own limit and the limits add up to STEP_BUDGET_S (480 s) or less, so the
# whole run fits one 10-minute call with room for start-up. Every step writes its results under
# $OUT as soon as it ends (CSV files, verdict lines in $OUT/verdicts.jsonl, the log), so a step
# killed later loses nothing measured before it. The run ends with one verdict table:
# measure, goal, value, pass/fail.
# Usage: OUT=/some/dir bash bench/gpu_check.sh      (--dry-run: list the steps, run nothing)
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
DRY_RUN=0
MODE=${1:-}
[ "$MODE" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-bench/results/gpu-check}
STEP_BUDGET_S=480
[ "$MODE" = "--versions" ] || [ "$MODE" = "--verdict-table" ] || mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
VERDICTS="$OUT/verdicts.jsonl"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
status=0
planned=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  planned=$((planned + limit))
  if [ "$DRY_RUN" = 1 ]; then
    echo "step $name $limit $*"
    return 0
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
  sync
  return "$rc"
}

stop() {  # stop REASON: the kernels cannot be checked here; say why and end the run
  [ "$DRY_RUN" = 1 ] && return 0
  echo "gpu_check STOPPED: $1" | tee -a "$LOG"
  echo "Versions are at the top of $LOG; supported ones are in docs/compatibility.md." | tee -a "$LOG"
  verdict_table "$VERDICTS" | tee -a "$LOG"
  exit 1
}

verdict_table() {  # verdict_table FILE: the verdict lines every step appended, as one table
  python3 - "$1" <<'PY' 2>&1
import json, os, sys
path = sys.argv[1]
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
head = ("measure", "goal", "value", "pass/fail")
table = [head] + [(r["measure"], r["goal"], r["value"], "pass" if r["pass"] else "FAIL") for r in rows]
widths = [max(len(row[i]) for row in table) for i in range(4)]
print("\n== verdict ==")
for n, row in enumerate(table):
    print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    if n == 0:
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
if not rows:
    print("(no measurement reached its verdict)")
PY
}

versions() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import numpy, sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
}

# Helper modes, run as steps of their own (so they have a limit too).
[ "$MODE" = "--versions" ] && { versions; exit; }
[ "$MODE" = "--verdict-table" ] && { verdict_table "$2"; exit; }

if [ "$DRY_RUN" = 0 ]; then
  : > "$LOG"
  : > "$VERDICTS"
fi
step versions 15 bash "$SELF" --versions
# The gate's arch: compute capability 9.x and newer builds the sm_90 configs, 8.x the sm_80 ones.
ARCH=90
if [ "$DRY_RUN" = 0 ]; then
  ARCH=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(90 if major >= 9 else 80 if major >= 8 else 0)" 2>>"$LOG") \
    || stop "torch sees no CUDA device"
  [ "$ARCH" != 0 ] || stop "compute capability below 8.0: the kernels target sm_80 and sm_90"
fi

step install 45 python3 -m pip install -q --no-deps --no-build-isolation -e . || stop "the checkout did not install"
# Every kernel config the launchers pick for this GPU (fp8 ones included), compiled by this Triton.
step compile-gate 95 python3 -m cbkernels.aot --quiet --arch "$ARCH" \
  || stop "the kernels do not compile for sm_$ARCH with this Triton (table above: compile errors or spills)"
# One compiled launch of each kernel (KV cache and attention, bf16) against the reference.
step selfcheck 30 cbkernels selfcheck --device cuda --dtype bfloat16 \
  || stop "a compiled kernel failed or disagreed with the reference (selfcheck above)"
# Decode GB/s against the HBM ceiling; the attention fast path before/after
# (CBKERNELS_ATTN_FAST_PATHS=0 vs 1) and the wide decode tile; prefill TFLOP/s against SDPA-flash:
# verdict lines, each written as it is measured.
step paged-attention-bench 90 python3 bench/bench_paged_attention.py --quick --fast-paths --out "$OUT" --verdicts "$VERDICTS"
# bf16 against fp8 (e4m3, e5m2) caches at 4k-32k context: GB/s of bytes read, tokens/s, the 1.7x goal.
step fp8-decode 50 python3 bench/bench_fp8_decode.py --out "$OUT" --verdicts "$VERDICTS"
step kv-cache-bench 15 python3 bench/bench_kv_cache.py --out "$OUT"
# Engine with and without asynchronous scheduling (tokens/s, host ms per step, cache sizing).
step engine-overlap 35 cbkernels bench overlap --random-llama 4 --prompts 64 --max-new-tokens 32 --quiet --out "$OUT"
# Host work per step at 256 running decodes with the forward on this GPU (goal: under 1 ms).
step engine-host 15 cbkernels bench host --quick --out "$OUT"
step engine-bench 30 cbkernels bench peers --random-llama 4 --prompts 48 --max-new-tokens 48 --quiet --skip-default-peer --out "$OUT"
# Every kernel once per dtype on the compiled kernels: scatter / gather / copy (fp16, bf16, fp32
# and both fp8 formats), attention per dtype and head dim, fp8 attention over mixed batches.
step cuda-tests 50 pytest -q -p no:cacheprovider tests/test_kv_cache.py tests/test_paged_attention.py tests/test_fp8.py \
  -k "scatter_matches or gather_matches or copy_blocks_matches or test_head_dims or test_fp8"
step verdict 10 bash "$SELF" --verdict-table "$VERDICTS"
if [ "$DRY_RUN" = 1 ]; then
  echo "total ${planned}s of ${STEP_BUDGET_S}s"
  [ "$planned" -le "$STEP_BUDGET_S" ] || { echo "step limits exceed the budget"; exit 1; }
  exit 0
fi
echo "gpu_check finished with status $status" | tee -a "$LOG"
exit $status

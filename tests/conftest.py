"""Test setup. On a machine without CUDA the Triton kernels run in Triton's CPU interpreter:
TRITON_INTERPRET must be set before any @triton.jit function is defined, hence here, first.

Converted models: the session fixture ``model_cache_dir`` points CBKERNELS_CACHE_DIR at one
temporary directory for the whole run (removed at its end), so the default GGUF model converts
once per run and every test, and every subprocess a test starts, loads that one copy. A
CBKERNELS_CACHE_DIR already set (e.g. ``CBKERNELS_CACHE_DIR=~/.cache/cbkernels pytest``) is
used as it is, keeping the conversion across runs.

Hypothesis profiles: ``ci`` (default, sized to keep the suite within CI's budget) and
``thorough`` (CBKERNELS_HYPOTHESIS_PROFILE=thorough), which draws many more examples.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two torch threads fighting over a busy 2-core machine made the references 100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(
    deadline=None,  # interpreter timings vary widely
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# ci: the same examples every run, so a red CI is a reproducible bug, never a lucky draw;
# thorough: fresh random examples each run, to go looking for new ones.
settings.register_profile("ci", max_examples=int(os.environ.get("CBKERNELS_CI_EXAMPLES", 12)), derandomize=True,
                          **_COMMON)
settings.register_profile("thorough", max_examples=300, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("CBKERNELS_HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if ON_CUDA else "cpu"


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir():
    given = os.environ.get("CBKERNELS_CACHE_DIR")
    if given:
        yield Path(given)
        return
    path = tempfile.mkdtemp(prefix="cbkernels-test-cache-")
    os.environ["CBKERNELS_CACHE_DIR"] = path  # inherited by the CLI and quickstart subprocesses
    try:
        yield Path(path)
    finally:
        os.environ.pop("CBKERNELS_CACHE_DIR", None)
        shutil.rmtree(path, ignore_errors=True)

"""Start-up stays cheap: the command line's --help (and ``cache info``) import neither torch nor
transformers, and ``import cbkernels`` loads its public names on first use without changing them."""
import json
import subprocess
import sys

import pytest

# Runs the command line in a fresh interpreter and reports which heavy modules it imported.
PROBE = """
import json, sys
from cbkernels.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def _probe(*args):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["bench", "--help"], ["cache", "--help"]])
def test_help_imports_neither_torch_nor_transformers(args):
    result, out = _probe(*args)
    assert result == {"code": 0, "torch": False, "transformers": False}, out
    assert "usage: cbkernels" in out


def test_cache_info_imports_neither_torch_nor_transformers(tmp_path):
    result, out = _probe("cache", "info", "--cache-dir", str(tmp_path))
    assert result == {"code": 0, "torch": False, "transformers": False}, out
    assert f"cache directory: {tmp_path}" in out


def test_generate_help_names_the_cache_dir_flag():
    result, out = _probe("generate", "--help")
    assert "--cache-dir" in out


def test_import_cbkernels_is_lazy_and_keeps_its_public_names():
    code = """
import json, sys
import cbkernels
light = "torch" not in sys.modules and "transformers" not in sys.modules
names = list(cbkernels.__all__)
resolved = all(getattr(cbkernels, n) is not None for n in names)
from cbkernels.ops import paged_attention
from cbkernels.engine.engine import Engine
print(json.dumps({"light": light, "names": names, "resolved": resolved,
                  "same": cbkernels.paged_attention is paged_attention and cbkernels.Engine is Engine,
                  "dir": set(names) <= set(dir(cbkernels)), "sub": cbkernels.reference.__name__}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["light"] and result["resolved"] and result["same"] and result["dir"]
    assert result["sub"] == "cbkernels.reference"
    assert result["names"] == [
        "scatter_kv", "gather_kv", "copy_blocks", "paged_attention",
        "BatchConfig", "Engine", "RequestOutput", "RequestStatus", "generate_batch", "register",
        "PagedAttentionCache", "CacheAllocator", "FullAttentionCacheAllocator", "SlidingAttentionCacheAllocator",
        "BlockPool", "Scheduler", "FIFOScheduler", "PrefillFirstScheduler", "PrometheusExporter", "enable", "disable",
        "__version__",
    ]


def test_unknown_attribute_is_still_an_attribute_error():
    import cbkernels

    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        cbkernels.not_a_name

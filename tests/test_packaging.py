"""`pip install .` (not only the editable install) ships every package, with kernels/ and reference/ mapped into the cbkernels namespace."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"cbkernels." + ".".join(p.parent.relative_to(ROOT / "cbkernels").parts)
             for p in (ROOT / "cbkernels").rglob("__init__.py") if p.parent != ROOT / "cbkernels"}
    assert found | {"cbkernels", "cbkernels.kernels", "cbkernels.reference"} == listed
    assert config["package-dir"] == {"cbkernels": "cbkernels", "cbkernels.kernels": "kernels",
                                     "cbkernels.reference": "reference"}


def test_regular_install_has_kernels_references_and_benchmarks(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    package = target / "cbkernels"
    for module in ("kernels/paged_attention.py", "kernels/kv_cache.py", "reference/paged_attention.py",
                   "benchmarks/peers.py", "cli/__init__.py", "engine/engine.py", "attention/backend.py",
                   "ops/checks.py", "engine/scheduler_names.py"):
        assert (package / module).is_file(), module
    assert not (target / "kernels").exists(), "kernels/ must not install as a top-level package"

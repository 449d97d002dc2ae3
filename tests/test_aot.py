"""Ahead-of-time compile gate: every kernel config the launchers can pick builds for sm_80
and sm_90 without a GPU, with no register spills and shared memory within the limit.

Runs ``python -m cbkernels.aot`` in a subprocess: the test session itself has Triton's
interpreter on, which replaces the @triton.jit functions the compiler needs. The configs
depend on the Triton release (paged_attention_tiles.version_choices); the tests below the
gate's check that the gate builds exactly what the launcher picks on the running release.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from cbkernels.aot import ARCHS, KERNEL_MODULES, SHARED_MEMORY_LIMIT
from cbkernels.kernels import paged_attention_aot as pa_aot
from cbkernels.kernels import paged_attention_tiles as tiles
from cbkernels.kernels.fp8 import FP8_FORMATS, FP8_QUERY_DTYPES_CUDA


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


def test_gate_names_the_triton_it_ran_on(gate):
    proc, results = gate
    assert proc.stdout.startswith(f"compile gate: triton {triton.__version__}, ptxas "), proc.stdout[:200]
    assert {r["triton"] for r in results} == {triton.__version__}


# Head dims the launcher accepts (16..256, multiples of 8) reduce to the three pads.
_HEAD_DIMS = (16, 40, 64, 96, 128, 200, 256)
# (max_seqlen_q, group): one decode token, a decode filling the 16-row tile exactly, two tokens or
# 32 heads (the wide decode tile at fp16/bf16 D <= 128), a group of 64, prefills.
_SHAPES = ((1, 1), (1, 16), (2, 16), (1, 32), (1, 64), (300, 4))


def _config_name(kind: str, dtype: torch.dtype, d_pad: int, tile, kv: str = "") -> str:
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    kv = f",kv={kv}" if kv else ""
    return (f"paged_attention[{kind},{name}{kv},d{d_pad},m{tile.block_m},n{tile.block_n},"
            f"w{tile.num_warps},s{tile.num_stages}]")


def test_gate_configs_are_exactly_the_launchers_picks():
    """Every tile pick_tile can return on this Triton is a gate config for that arch, and every
    gate config of the attention kernel is such a pick: no config compiled for nothing, none missed."""
    gate = {(c.name, arch) for c in pa_aot.aot_configs() if c.name.startswith("paged_attention[")
            for arch in c.archs}
    picked = set()
    for arch in tiles.TILES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in _HEAD_DIMS:
                for max_seqlen_q, group in _SHAPES:
                    tile = tiles.pick_tile(arch, dtype, head_dim, max_seqlen_q, group)
                    kind = tiles.tile_kind(arch, dtype, head_dim, max_seqlen_q, group)[0]
                    d_pad = tiles.padded_head_dim(head_dim)
                    picked.add((_config_name(kind, dtype, d_pad, tile), arch))
                    # fp8 caches run the tile of their query dtype (fp16 / bf16 on CUDA).
                    for fmt in FP8_FORMATS.values():
                        if arch >= fmt.min_arch and dtype in FP8_QUERY_DTYPES_CUDA:
                            picked.add((_config_name(kind, dtype, d_pad, tile, fmt.triton_name), arch))
    assert picked == gate


def test_fp8_archs_are_what_the_gate_decided(gate):
    """Every fp8 config compiled cleanly where it is listed: sm_90 only, for both formats
    (kernels/fp8.py says why not sm_80)."""
    _, results = gate
    fp8 = {(r["kernel"], r["arch"]) for r in results if "fp8" in r["kernel"]}
    assert any("fp8e4nv" in k and a == "sm_90" for k, a in fp8)
    assert any("fp8e5" in k and a == "sm_90" for k, a in fp8)
    assert not any(a == "sm_80" for _, a in fp8)
    for kernel in ("scatter_kv[fp8", "gather_kv[fp8", "paged_attention[decode,bf16,kv=fp8"):
        assert any(k.startswith(kernel) for k, _ in fp8), kernel


def test_e4m3_still_refused_on_sm80():
    """The reason e4m3 needs sm_90 (kernels/fp8.py): re-checked, so a Triton that starts
    building it on sm_80 shows up here and the restriction can be lifted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("from cbkernels.aot import all_configs, compile_config\n"
              "c = next(c for c in all_configs(('kv_cache',)) if c.name.startswith('scatter_kv[fp8e4nv'))\n"
              "print(compile_config(c, 80).error)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "fp8e4nv not supported in this architecture" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_triton_version_parsing():
    assert tiles.triton_version("3.6.0") == (3, 6)
    assert tiles.triton_version("3.10.1") == (3, 10)
    assert tiles.triton_version("3.7.0+git0123abc") == (3, 7)
    assert tiles.triton_version("3.8rc1") == (3, 8)
    assert tiles.TRITON_VERSION == tiles.triton_version(triton.__version__)


def test_triton_3_6_drops_pipelining_only_on_sm90_half_precision_prefill():
    old, new = tiles.version_choices((3, 6), False), tiles.version_choices((3, 9), False)
    assert tiles.version_choices((3, 7), False) == new
    assert tiles._tiles(80, old) == tiles._tiles(80, new)
    old90, new90 = tiles._tiles(90, old), tiles._tiles(90, new)
    changed = {key for key in new90 if old90[key] != new90[key]}
    assert changed == {("prefill", 2, 64), ("prefill", 2, 128), ("prefill", 2, 256)}
    for key in changed:
        assert old90[key].num_stages == 1 and new90[key].num_stages >= 2
        assert (old90[key].block_m, old90[key].block_n, old90[key].num_warps) == \
            (new90[key].block_m, new90[key].block_n, new90[key].num_warps)


def test_while_loops_only_where_triton_3_6_interprets():
    assert tiles.version_choices((3, 6), True).interpreter_while_loops
    assert not tiles.version_choices((3, 6), False).interpreter_while_loops  # compiled: the pipelined loop
    assert not tiles.version_choices((3, 7), True).interpreter_while_loops
    assert not tiles.version_choices((3, 9), True).interpreter_while_loops
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not interpreting:
        assert tiles.LOOP_RANGE is triton.language.range
    elif tiles.version_choices(tiles.TRITON_VERSION, True).interpreter_while_loops:
        assert tiles.LOOP_RANGE is tiles._while_range
    else:
        assert tiles.LOOP_RANGE is range


@pytest.mark.parametrize("args", [(5,), (0,), (2, 6), (6, 2), (-3, 1)])
def test_while_range_visits_what_range_does(args):
    assert list(tiles._while_range(*args)) == list(range(*args))

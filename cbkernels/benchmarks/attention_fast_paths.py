"""The paged-attention kernel's tile-level fast path before/after, and its wide decode tile, on CUDA.

Before/after: CBKERNELS_ATTN_FAST_PATHS=0 (every KV tile masked: the kernel as it was) against 1
(interior tiles unmasked), in one process on the same inputs. Wide decode: 32 query heads per
KV head (the 32-row decode tile) against 16 (the 16-row one) reading the same K/V bytes.
Run by ``python bench/bench_paged_attention.py --fast-paths`` (bench/gpu_check.sh).
"""
from __future__ import annotations

import os

import torch

from cbkernels.testing import TOLERANCES

from .paged_inputs import L2_BYTES, _attend, _paged_inputs, _rotating_bench, append_verdict

# Fast-path A/B cases: (name, [(q_len, kv_len)] per sequence, Hq, Hkv, sliding window), bf16, D 128.
FAST_PATH_CASES = (
    ("decode", [(1, 4096)] * 64, 32, 8, None),
    ("decode, window 1000", [(1, 4096)] * 64, 32, 8, 1000),
    ("chunked prefill", [(512, 4096)] * 4, 32, 8, None),
    ("prefill", [(2048, 2048)] * 4, 32, 8, None),
)
# Goals: the fast path is not slower anywhere; 32 query heads per KV head (the wide decode tile)
# take at most this much longer than 16 reading the same K/V bytes.
FAST_PATH_GOAL = 1.0
WIDE_DECODE_GOAL = 1.1


def _timed_with_fast_paths(inp, out, value: str, **options) -> float:
    """ms of one launch with CBKERNELS_ATTN_FAST_PATHS=value (the launcher reads it at each call)."""
    from cbkernels.kernels.paged_attention import FAST_PATHS_ENV

    old = os.environ.get(FAST_PATHS_ENV)
    os.environ[FAST_PATHS_ENV] = value
    try:
        _attend(inp, out, **options)()
        return _rotating_bench(lambda i: _attend(inp, out, **options), L2_BYTES)
    finally:
        os.environ.pop(FAST_PATHS_ENV) if old is None else os.environ.__setitem__(FAST_PATHS_ENV, old)


def bench_fast_paths(verdicts=None) -> list[dict]:
    """Before/after of the fast path per case, then the wide decode tile; each verdict is written
    as soon as it is measured."""
    rows, dtype, d = [], torch.bfloat16, 128
    for name, lengths, hq, hkv, window in FAST_PATH_CASES:
        inp = _paged_inputs(lengths, hq, hkv, d, 16, dtype, "cuda")
        outs = {v: torch.empty_like(inp["q"]) for v in ("0", "1")}
        ms = {v: _timed_with_fast_paths(inp, outs[v], v, sliding_window=window) for v in ("0", "1")}
        diff = (outs["0"].float() - outs["1"].float()).abs().max().item()
        rows.append(dict(case=name, batch=len(lengths), context=max(kv for _, kv in lengths), hq=hq, hkv=hkv,
                         ms_masked=ms["0"], ms_fast=ms["1"], speedup=ms["0"] / ms["1"], max_abs_diff=diff,
                         match=diff <= TOLERANCES[dtype]))
        append_verdict(verdicts, f"attention fast path speedup, {name} (bf16, D 128)", f">= {FAST_PATH_GOAL:.2f}x",
                       f"{ms['0'] / ms['1']:.3f}x", ms["0"] / ms["1"] >= FAST_PATH_GOAL and rows[-1]["match"])
        del inp, outs
    lengths = [(1, 4096)] * 64
    ms = {}
    for hq in (16, 32):  # one KV head: the same K/V bytes, 16 or 32 query rows per program
        inp = _paged_inputs(lengths, hq, 1, d, 16, dtype, "cuda")
        ms[hq] = _rotating_bench(lambda i, inp=inp, out=torch.empty_like(inp["q"]): _attend(inp, out), L2_BYTES)
        del inp
    rows.append(dict(case="decode, 32 vs 16 query heads per KV head", batch=64, context=4096, hq=32, hkv=1,
                     ms_16_heads=ms[16], ms_32_heads=ms[32], time_ratio=ms[32] / ms[16]))
    append_verdict(verdicts, "wide decode tile: 32 vs 16 query heads per KV head, same K/V bytes (batch 64, 4k)",
                   f"<= {WIDE_DECODE_GOAL}x the time", f"{ms[32] / ms[16]:.3f}x", ms[32] / ms[16] <= WIDE_DECODE_GOAL)
    torch.cuda.empty_cache()
    return rows


# Columns of the printed table (the CSV has every key).
COLUMNS = ["case", "batch", "context", "hq", "hkv", "ms_masked", "ms_fast", "speedup", "match", "ms_16_heads",
           "ms_32_heads", "time_ratio"]

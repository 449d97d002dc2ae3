"""Shared pieces of the attention benchmarks: paged inputs on the GPU, L2-rotating timing, one
attention launch, and gpu_check's verdict lines."""
from __future__ import annotations

import math

import torch

import cbkernels

# Inputs are rotated until their bytes exceed this, so timings never come from a warm L2
# (H100 L2 is 50 MB).
L2_BYTES = 50 * 1024**2
MAX_ROTATION_COPIES = 16


def _paged_inputs(lengths, hq, hkv, d, block, dtype, device, *, shuffle=True, seed=0):
    """A paged batch without poison (too slow at benchmark sizes): random data, random tables."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = [math.ceil(kv / block) for _, kv in lengths]
    num_blocks = sum(blocks) + 1
    order = torch.randperm(num_blocks, device=device, generator=gen) if shuffle else torch.arange(num_blocks, device=device)
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.int32, device=device)
    cursor = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[cursor:cursor + n].to(torch.int32)
        cursor += n
    k_cache = torch.randn(num_blocks, block, hkv, d, dtype=dtype, device=device, generator=gen)
    v_cache = torch.randn(num_blocks, block, hkv, d, dtype=dtype, device=device, generator=gen)
    q_lens = [q for q, _ in lengths]
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=device, generator=gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, device=device), 0)
    seq_lens = torch.tensor([kv for _, kv in lengths], dtype=torch.int32, device=device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=seq_lens, cu_seqlens_q=cu,
                max_seqlen_q=max(q_lens), max_seqlen_k=max(kv for _, kv in lengths))


def _bytes_of(inp) -> int:
    return sum(t.numel() * t.element_size() for t in inp.values() if isinstance(t, torch.Tensor))


def _rotating_bench(make, count_bytes: int):
    """Time ``make(i)()`` callables, cycling over enough copies to defeat L2."""
    import triton.testing

    copies = max(1, min(MAX_ROTATION_COPIES, math.ceil(L2_BYTES / max(count_bytes, 1))))
    fns = [make(i) for i in range(copies)]
    state = {"i": 0}

    def run():
        fns[state["i"] % copies]()
        state["i"] += 1

    return triton.testing.do_bench(run, warmup=25, rep=100)  # ms


def _attend(inp, out, **options):
    return lambda: cbkernels.paged_attention(
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"], inp["cu_seqlens_q"],
        out=out, max_seqlen_q=inp["max_seqlen_q"], max_seqlen_k=inp["max_seqlen_k"], **options)


def append_verdict(path, measure: str, goal: str, value: str, ok: bool) -> None:
    """One line of gpu_check's verdict table, written as soon as it is measured (JSON lines)."""
    import json

    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"measure": measure, "goal": goal, "value": value, "pass": bool(ok)}) + "\n")

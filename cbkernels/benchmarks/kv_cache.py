"""KV-cache scatter / gather bandwidth against what transformers does every step.

transformers' continuous batching writes new K/V with ``index_copy_`` and reads each request's
whole history back with ``index_select``. This compares
``cbkernels.scatter_kv`` / ``gather_kv`` with those two calls on the same data, in GB/s
(bytes read + written) and, on CUDA, as a share of an H100's 3.0 TB/s copy ceiling (a
reference figure, not yet measured by this project: see ``common.H100_COPY_CEILING_GBPS``).

On CPU there is no Triton launch to time (the interpreter measures nothing useful), so it
says so and compares the fast PyTorch path with the raw torch calls: the ratio is the cost of
validation and dispatch. Writes a CSV (and a PNG when matplotlib is present) under
bench/results/.

    python bench/bench_kv_cache.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import cbkernels
from cbkernels.benchmarks.common import (
    H100_COPY_CEILING_GBPS, device_name, print_table, pyplot, result_path, time_ms, write_csv,
)

BLOCK_SIZE = 16
# (num_kv_heads, head_dim): Llama-3-8B, SmolLM2-135M, a small MQA model.
HEAD_SHAPES = [(8, 128), (3, 64), (1, 128)]
SCATTER_TOKENS = [16, 256, 4096]  # a decode batch, a prefill chunk, a large prefill
GATHER_BATCHES = [(8, 1024), (64, 1024), (16, 8192)]  # (sequences, context)


def _cache(num_tokens: int, hkv: int, dim: int, dtype, device):
    num_blocks = -(-num_tokens // BLOCK_SIZE) + 1
    shape = (num_blocks, BLOCK_SIZE, hkv, dim)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def bench_scatter(tokens, hkv, dim, dtype, device):
    k_cache, v_cache = _cache(tokens * 2, hkv, dim, dtype, device)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=device)[:tokens]
    key = torch.randn(tokens, hkv, dim, dtype=dtype, device=device)
    value = torch.randn_like(key)
    flat_k, flat_v = k_cache.view(-1, hkv, dim), v_cache.view(-1, hkv, dim)

    def peer():
        flat_k.index_copy_(0, slots, key)
        flat_v.index_copy_(0, slots, value)

    ours = time_ms(lambda: cbkernels.scatter_kv(key, value, k_cache, v_cache, slots))
    theirs = time_ms(peer)
    moved = 2 * 2 * key.numel() * key.element_size()  # k and v, read + written
    return ours, theirs, moved


def bench_gather(batch, context, hkv, dim, dtype, device):
    total = batch * context
    k_cache, v_cache = _cache(total, hkv, dim, dtype, device)
    perm = torch.randperm(k_cache.shape[0] - 1, device=device).to(torch.int32)
    per_seq = context // BLOCK_SIZE
    tables = perm[: batch * per_seq].view(batch, per_seq).contiguous()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    read_index = (tables.long()[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).flatten()
    flat_k, flat_v = k_cache.view(-1, hkv, dim), v_cache.view(-1, hkv, dim)

    def peer():
        flat_k.index_select(0, read_index)
        flat_v.index_select(0, read_index)

    ours = time_ms(lambda: cbkernels.gather_kv(k_cache, v_cache, tables, seq_lens))
    theirs = time_ms(peer)
    moved = 2 * 2 * total * hkv * dim * k_cache.element_size()
    return ours, theirs, moved


def _row(op, shape, dtype, ours, theirs, moved):
    gbps = moved / ours / 1e6
    row = {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "ours_ms": f"{ours:.4f}",
           "peer_ms": f"{theirs:.4f}", "ours_GBps": f"{gbps:.1f}", "peer_GBps": f"{moved / theirs / 1e6:.1f}",
           "speedup": f"{theirs / ours:.2f}"}
    if torch.cuda.is_available():
        row["pct_of_ceiling"] = f"{100 * gbps / H100_COPY_CEILING_GBPS:.1f}"
    return row


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['op']}\n{r['shape']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 4))
    ax.bar([i - 0.2 for i in x], [float(r["ours_GBps"]) for r in rows], 0.4, label="cbkernels")
    ax.bar([i + 0.2 for i in x], [float(r["peer_GBps"]) for r in rows], 0.4, label="index_copy_/index_select")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=6)
    ax.set_ylabel("GB/s (read + written)")
    ax.set_title(f"KV-cache copies on {device_name()}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--out", type=Path, help="result directory (default bench/results)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be benchmarked")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No CUDA device: timing the fast PyTorch path against raw index_copy_/index_select "
              "(the ratio is validation + dispatch overhead); GPU kernel speed needs a GPU.")
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    heads = HEAD_SHAPES[:1] if args.quick else HEAD_SHAPES
    scatter_tokens = SCATTER_TOKENS[-1:] if args.quick else SCATTER_TOKENS
    gathers = GATHER_BATCHES[:1] if args.quick else GATHER_BATCHES
    jobs = [("scatter_kv", (t, h, d), dt) for dt in dtypes for h, d in heads for t in scatter_tokens]
    jobs += [("gather_kv", (b, c, h, d), dt) for dt in dtypes for h, d in heads for b, c in gathers]
    from tqdm import tqdm

    rows = []
    for op, shape, dtype in tqdm(jobs, desc="kv-cache bench", unit="case", file=sys.stderr):
        fn = bench_scatter if op == "scatter_kv" else bench_gather
        label = "x".join(map(str, shape))
        rows.append(_row(op, label, dtype, *fn(*shape, dtype, device)))
    columns = list(rows[0])
    print_table(rows, columns)
    csv_path = result_path("kv_cache", "csv", args.out)
    write_csv(csv_path, rows)
    print(f"wrote {csv_path}")
    plot(rows, csv_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

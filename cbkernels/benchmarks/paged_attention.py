"""Benchmark of the paged attention kernel.

On CUDA:
* decode: achieved GB/s (K/V bytes read + q/out) and % of the HBM ceiling, over batch x context x
  (Hq, Hkv) x head_dim x block_size, bf16; the cost of paging (shuffled block table vs an
  identity one, and vs SDPA on contiguous K/V);
* prefill and a mixed batch: TFLOP/s against torch SDPA (flash backend) on the same data laid out
  dense, and against FlexAttention reading the paged cache through a mask_mod;
* ``--fast-paths``: the kernel's tile-level fast path before/after (CBKERNELS_ATTN_FAST_PATHS=0
  against 1, same process, same inputs) on decode, windowed decode, chunked and whole prefill, and
  the wide decode tile (32 query heads per KV head) against 16 heads reading the same K/V bytes.
Timing: triton.testing.do_bench, rotating over enough input copies to exceed L2 (50 MB).
Writes a table to stdout and CSV + PNG under bench/results/ (GPU name and date in the name).

On CPU there is nothing to time honestly: it says so, checks and times the torch fallback against
the float64 reference on tiny shapes, writes that CSV and exits 0.

Usage: python bench/bench_paged_attention.py [--quick] [--fast-paths]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import cbkernels
from cbkernels.ops import torch_path as _torch_ops
from cbkernels.reference.paged_attention import paged_attention as reference
from cbkernels.testing import TOLERANCES

from .attention_fast_paths import COLUMNS as FAST_PATH_COLUMNS, bench_fast_paths
from .common import H100_COPY_CEILING_GBPS as HBM_CEILING_GBPS, device_name, print_table, pyplot, result_path, write_csv
from .paged_inputs import (  # noqa: F401  (re-exported: the fp8 benchmark shares them)
    L2_BYTES, MAX_ROTATION_COPIES, _attend, _bytes_of, _paged_inputs, _rotating_bench, append_verdict,
)
# Caches beyond this fraction of free GPU memory are skipped (copies for rotation included).
MEMORY_FRACTION = 0.6

DECODE_SWEEP = dict(batch=(1, 8, 64, 256), context=(512, 4096, 32768), heads=((32, 32), (32, 8), (64, 8)),
                    head_dim=(64, 128), block=(16, 64))
DECODE_QUICK = dict(batch=(8, 64), context=(4096,), heads=((32, 8),), head_dim=(128,), block=(16,))
PREFILL_SWEEP = dict(seqs=((1, 4096), (4, 2048), (16, 512)), heads=((32, 8), (32, 32)), head_dim=(64, 128))
PREFILL_QUICK = dict(seqs=((4, 2048),), heads=((32, 8),), head_dim=(128,))


def _sdpa_ms(fn, nbytes: int) -> float:
    """SDPA time on the flash backend, or on whatever backend accepts the shape (GQA decode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backends in ([SDPBackend.FLASH_ATTENTION], [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
        try:
            with sdpa_kernel(backends):
                return _rotating_bench(lambda i: fn, nbytes)
        except RuntimeError:
            continue
    return float("nan")


def _fits(nbytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes * 2 < free * MEMORY_FRACTION  # x2: the identity-table twin


def bench_decode(sweep) -> list[dict]:
    import torch.nn.functional as F

    rows = []
    dtype, device = torch.bfloat16, "cuda"
    for batch in sweep["batch"]:
        for ctx in sweep["context"]:
            for hq, hkv in sweep["heads"]:
                for d in sweep["head_dim"]:
                    for block in sweep["block"]:
                        kv_bytes = 2 * batch * ctx * hkv * d * 2
                        copies = max(1, min(MAX_ROTATION_COPIES, math.ceil(L2_BYTES / kv_bytes)))
                        if not _fits(kv_bytes * copies):
                            continue
                        lengths = [(1, ctx)] * batch
                        inputs = [_paged_inputs(lengths, hq, hkv, d, block, dtype, device, seed=i) for i in range(copies)]
                        outs = [torch.empty_like(x["q"]) for x in inputs]
                        ms = _rotating_bench(lambda i, inputs=inputs, outs=outs: _attend(inputs[i], outs[i]), _bytes_of(inputs[0]))
                        moved = kv_bytes + 2 * batch * hq * d * 2
                        gbps = moved / ms / 1e6
                        # Cost of paging 1: the same kernel on an identity (contiguous) block table.
                        flat = [_paged_inputs(lengths, hq, hkv, d, block, dtype, device, shuffle=False, seed=i)
                                for i in range(copies)]
                        ms_flat = _rotating_bench(lambda i, flat=flat, outs=outs: _attend(flat[i], outs[i]), _bytes_of(flat[0]))
                        # Cost of paging 2: SDPA (flash) on contiguous K/V of the same sizes.
                        del flat
                        qd = torch.randn(batch, hq, 1, d, dtype=dtype, device=device)
                        kd = torch.randn(batch, hkv, ctx, d, dtype=dtype, device=device)
                        vd = torch.randn_like(kd)
                        ms_sdpa = _sdpa_ms(lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=hq != hkv),
                                           kv_bytes)
                        del qd, kd, vd
                        rows.append(dict(kind="decode", batch=batch, context=ctx, hq=hq, hkv=hkv, head_dim=d,
                                         block=block, ms=ms, gbps=gbps, pct_ceiling=100 * gbps / HBM_CEILING_GBPS,
                                         paging_cost_pct=100 * (ms / ms_flat - 1), sdpa_ms=ms_sdpa,
                                         vs_sdpa_pct=100 * (ms / ms_sdpa - 1)))
                        del inputs, outs
                        torch.cuda.empty_cache()
    return rows


def _dense_from_paged(inp, lengths, hkv):
    """Per sequence dense K/V [1, Hkv, L, D] gathered once (outside the timing)."""
    keys, values, _ = cbkernels.gather_kv(inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"])
    out, start = [], 0
    for _, kv in lengths:
        out.append((keys[start:start + kv].transpose(0, 1)[None].contiguous(),
                    values[start:start + kv].transpose(0, 1)[None].contiguous()))
        start += kv
    return out


def _flex_paged(inp, lengths, hq):
    """FlexAttention over the flattened paged cache: a mask_mod maps each physical slot back to its
    owner sequence and logical position (causal, bottom-right aligned)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    k_cache, v_cache = inp["k_cache"], inp["v_cache"]
    nb, block, hkv, d = k_cache.shape
    device = k_cache.device
    slots = nb * block
    owner = torch.full((slots,), -1, dtype=torch.int32, device=device)
    logical = torch.zeros(slots, dtype=torch.int32, device=device)
    for b, (_, kv) in enumerate(lengths):
        pos = torch.arange(kv, device=device)
        phys = inp["block_tables"][b, pos // block].long() * block + pos % block
        owner[phys] = b
        logical[phys] = pos.to(torch.int32)
    q_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32),
                                    torch.tensor([q for q, _ in lengths], device=device))
    q_pos = torch.cat([torch.arange(kv - q, kv, device=device, dtype=torch.int32) for q, kv in lengths])

    def mask_mod(b, h, qi, ki):
        return (owner[ki] == q_seq[qi]) & (logical[ki] <= q_pos[qi])

    total_q = inp["q"].shape[0]
    mask = create_block_mask(mask_mod, None, None, total_q, slots, device=device)
    kf = k_cache.view(slots, hkv, d).transpose(0, 1)[None]
    vf = v_cache.view(slots, hkv, d).transpose(0, 1)[None]
    qf = inp["q"].transpose(0, 1)[None]
    compiled = torch.compile(flex_attention)
    return lambda: compiled(qf, kf, vf, block_mask=mask, enable_gqa=hq != hkv)


def bench_prefill(sweep) -> list[dict]:
    import torch.nn.functional as F

    rows = []
    dtype, device = torch.bfloat16, "cuda"
    cases = [("prefill", [(length, length)] * n) for n, length in sweep["seqs"]]
    # Mixed: 64 decodes at 4k context, two chunked prefills of 512 over a 2k prefix, one whole 1k.
    cases.append(("mixed", [(1, 4096)] * 64 + [(512, 2560)] * 2 + [(1024, 1024)]))
    for kind, lengths in cases:
        for hq, hkv in sweep["heads"]:
            for d in sweep["head_dim"]:
                inp = _paged_inputs(lengths, hq, hkv, d, 16, dtype, device)
                out = torch.empty_like(inp["q"])
                # Causal FLOPs: 2 matmuls x 2 flops x sum over query rows of the keys each sees.
                seen = sum(q * (kv - q) + q * (q + 1) / 2 for q, kv in lengths)
                flops = 4 * hq * d * seen
                # Prefill is compute-bound: one copy of the inputs (no L2 rotation needed).
                ms = _rotating_bench(lambda i, inp=inp, out=out: _attend(inp, out), L2_BYTES)
                dense = _dense_from_paged(inp, lengths, hkv)
                qs = [inp["q"][s:e].transpose(0, 1)[None].contiguous()
                      for s, e in zip(inp["cu_seqlens_q"][:-1].tolist(), inp["cu_seqlens_q"][1:].tolist())]

                def sdpa(dense=dense, qs=qs, lengths=lengths, hq=hq, hkv=hkv):
                    for (k, v), qq, (q_len, kv) in zip(dense, qs, lengths):
                        # Bottom-right causal: a whole prefill is plain is_causal; decode rows see all.
                        F.scaled_dot_product_attention(qq, k, v, is_causal=q_len == kv and q_len > 1,
                                                       enable_gqa=hq != hkv)

                # SDPA runs one call per sequence. In the mixed batch the decode rows see every key
                # and the chunked rows are timed unmasked (SDPA-flash has no bottom-right mask):
                # the same FLOP count within a few %, a speed yardstick only.
                ms_sdpa = _sdpa_ms(sdpa, L2_BYTES)
                ms_flex = float("nan")
                try:
                    flex = _flex_paged(inp, lengths, hq)
                    flex()
                    ms_flex = _rotating_bench(lambda i: flex, L2_BYTES)
                except Exception as exc:  # flex needs triton codegen; report, do not fail
                    print(f"flex attention unavailable: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
                rows.append(dict(kind=kind, batch=len(lengths), context=max(kv for _, kv in lengths), hq=hq,
                                 hkv=hkv, head_dim=d, block=16, ms=ms, tflops=flops / ms / 1e9,
                                 sdpa_ms=ms_sdpa, vs_sdpa_flash=ms_sdpa / ms, flex_ms=ms_flex, vs_flex=ms_flex / ms))
                del inp, dense, qs
                torch.cuda.empty_cache()
    return rows


def _plot(rows: list[dict], out_dir) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    decode = [r for r in rows if r["kind"] == "decode"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for ctx in sorted({r["context"] for r in decode}):
        pts = sorted((r["batch"], r["pct_ceiling"]) for r in decode
                     if r["context"] == ctx and r["hq"] == 32 and r["hkv"] == 8 and r["head_dim"] == 128 and r["block"] == 16)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"ctx {ctx}")
    ax.axhline(80, color="grey", linestyle="--", label="goal 80%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (decodes)")
    ax.set_ylabel(f"% of {HBM_CEILING_GBPS / 1000:.1f} TB/s")
    ax.set_title(f"paged attention decode, bf16, Hq/Hkv 32/8, D 128, block 16 ({device_name()})")
    ax.legend()
    path = str(result_path("paged_attention", "png", out_dir))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- CPU
def bench_cpu() -> list[dict]:
    """Torch fallback vs the float64 reference on tiny shapes: correctness and wall time."""
    from cbkernels.testing import make_paged_batch

    rows = []
    cases = [("decode", [(1, 512)] * 8), ("prefill", [(128, 128)] * 2), ("mixed", [(1, 300)] * 4 + [(32, 96)])]
    for kind, lengths in cases:
        for dtype in (torch.float32, torch.bfloat16):
            b = make_paged_batch(lengths, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
            args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q)
            out = torch.empty_like(b.q)
            timings = {}
            for name, fn in (("torch_fallback", lambda: _torch_ops.paged_attention(
                    *args, out, None, scale=64**-0.5, sliding_window=None, softcap=None, sinks=None)),
                    ("reference_fp64", lambda: reference(*args))):
                fn()
                start = time.perf_counter()
                for _ in range(3):
                    fn()
                timings[name] = (time.perf_counter() - start) / 3 * 1e3
            err = (out.double() - reference(*args).double()).abs().max().item()
            rows.append(dict(kind=kind, dtype=str(dtype).removeprefix("torch."), batch=len(lengths),
                             fallback_ms=timings["torch_fallback"], reference_ms=timings["reference_fp64"],
                             max_abs_err=err, match=err <= TOLERANCES[dtype]))
    return rows


# Goals of the verdict table (bench/gpu_check.sh): decode streams K/V at >= 80% of the HBM copy
# ceiling (the line on the decode plot); prefill runs at >= 0.8x SDPA-flash's speed on the same
# work laid out dense (SDPA cannot read a paged cache; a yardstick, not a peer).
DECODE_PCT_GOAL = 80.0
PREFILL_VS_SDPA_GOAL = 0.8


def _verdicts(path, decode: list[dict], prefill: list[dict]) -> None:
    if decode:
        best = max(decode, key=lambda r: r["pct_ceiling"])
        append_verdict(path, f"decode bf16 GB/s, best of sweep (batch {best['batch']}, ctx {best['context']})",
                       f">= {DECODE_PCT_GOAL:.0f}% of {HBM_CEILING_GBPS:.0f} GB/s",
                       f"{best['gbps']:.0f} GB/s ({best['pct_ceiling']:.0f}%)", best["pct_ceiling"] >= DECODE_PCT_GOAL)
    for r in prefill:
        append_verdict(path, f"{r['kind']} TFLOP/s vs SDPA-flash (batch {r['batch']}, ctx {r['context']})",
                       f">= {PREFILL_VS_SDPA_GOAL}x", f"{r['tflops']:.0f} TFLOP/s ({r['vs_sdpa_flash']:.2f}x)",
                       r["vs_sdpa_flash"] >= PREFILL_VS_SDPA_GOAL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sweep")
    parser.add_argument("--out", help="result directory (default bench/results)")
    parser.add_argument("--verdicts", help="append gpu_check verdict lines (JSON) to this file")
    parser.add_argument("--fast-paths", action="store_true",
                        help="also time the fast path before/after and the wide decode tile (after decode)")
    args = parser.parse_args(argv)
    out_dir = args.out  # None: bench/results
    if not torch.cuda.is_available():
        print("No CUDA device: the Triton kernel cannot be timed here (the interpreter measures Python, "
              "not the kernel). Checking and timing the CPU torch fallback against the fp64 reference instead.")
        if args.fast_paths:
            print("--fast-paths: the before/after of the compiled kernel needs CUDA; not measured here.")
        rows = bench_cpu()
        print_table(rows, ["kind", "dtype", "batch", "fallback_ms", "reference_ms", "max_abs_err", "match"])
        csv_path = result_path("paged_attention", "csv", out_dir)
        write_csv(csv_path, rows)
        print(f"\nwrote {csv_path}")
        return 0
    torch.manual_seed(0)
    decode = bench_decode(DECODE_QUICK if args.quick else DECODE_SWEEP)
    print_table(decode, ["batch", "context", "hq", "hkv", "head_dim", "block", "ms", "gbps", "pct_ceiling",
                          "paging_cost_pct", "vs_sdpa_pct"])
    _verdicts(args.verdicts, decode, [])
    if args.fast_paths:
        fast = bench_fast_paths(args.verdicts)
        print()
        print_table(fast, FAST_PATH_COLUMNS)
        fast_csv = result_path("paged_attention_fast_paths", "csv", out_dir)
        write_csv(fast_csv, fast)
        print(f"wrote {fast_csv}")
    prefill = bench_prefill(PREFILL_QUICK if args.quick else PREFILL_SWEEP)
    print()
    print_table(prefill, ["kind", "batch", "context", "hq", "hkv", "head_dim", "ms", "tflops", "vs_sdpa_flash",
                           "vs_flex"])
    _verdicts(args.verdicts, [], prefill)
    rows = decode + prefill
    csv_path = result_path("paged_attention", "csv", out_dir)
    write_csv(csv_path, rows)
    print(f"\nwrote {csv_path}")
    png = _plot(rows, out_dir)
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

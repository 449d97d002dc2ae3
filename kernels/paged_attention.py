"""Paged attention over a mixed batch (decodes, chunked prefills, whole prefills) in one launch.

Layout of the work
------------------
* Query rows are packed with their heads: for KV head ``h``, sequence ``b`` owns the flattened
  rows ``(token, head_in_group)`` -> ``token * group + head_in_group``, ``Lq * group`` in all.
  A program takes ``BLOCK_M`` consecutive flattened rows of one sequence, so every query head
  of a KV head shares the K/V tiles it loads (GQA packing), and a single decode token still
  fills ``group`` rows of the ``tl.dot`` M dimension (padded to 16 at least).
* Grid ``(virtual_tiles, Hkv, num_splits)``. Sequence ``b`` starts at virtual tile
  ``(cu_seqlens_q[b] * group) // BLOCK_M + b``: strictly increasing in ``b`` and leaving each
  sequence at least ``cdiv(Lq * group, BLOCK_M)`` tiles, so the total is bounded by
  ``cdiv(T * group, BLOCK_M) + B``, known on the host from shapes alone. A program finds its
  sequence by binary search over ``cu_seqlens_q``; idle programs exit at once. No
  device-to-host sync when ``max_seqlen_q`` / ``max_seqlen_k`` are given (graph-capturable).
* Causal (bottom-right aligned) and sliding-window limits give each tile a key range
  ``[lo, hi)``; KV tiles wholly outside it are never visited (never read).
* Split-KV (flash-decoding): with few programs and long contexts, axis 2 cuts each tile's
  key range into ``num_splits`` segments that write fp32 partials (normalised acc and
  log2-sum-exp) into a workspace the caller provides (or a fresh one);
  ``_merge_splits_kernel`` combines them. Launch decisions live in ``paged_attention_tiles``.
* Softmax runs in base 2 with ``log2(e)`` folded into the scale; softcap uses a tanh built
  from ``exp2`` of a non-positive argument, which cannot overflow.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .fp8 import FP8_FORMATS
from .paged_attention_tiles import (  # noqa: F401  (re-exported: the launch decisions of this kernel)
    DECODE_BLOCK_M, INTERPRETER_SM_COUNT, MAX_SPLITS, MERGE_NUM_STAGES, MERGE_NUM_WARPS, MIN_D_PAD, TILES, LaunchPlan, Tile,
    num_virtual_tiles, padded_head_dim, pick_num_splits, pick_tile, plan_launch,
)
from .paged_attention_tiles import LOOP_RANGE

LOG2E = 1.4426950408889634  # 1 / ln 2: exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln 2: converts the kernel's base-2 log-sum-exp to natural log
# Initial running max. Finite, so a row that has seen only masked keys gives
# exp2(-inf - NEG_BIG) = 0 and exp2(NEG_BIG - NEG_BIG) = 1 instead of NaN from -inf - -inf.
NEG_BIG = -1.0e30
# The same numbers as compile-time constants for the jit functions (globals must be constexpr).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
_NEG_BIG = tl.constexpr(NEG_BIG)
_NEG_TWO_LOG2E = tl.constexpr(-2.0 * LOG2E)

@triton.jit
def _mask_scores(s, k_pos, k_ok, q_pos, window):
    """-inf where a key is past the sequence, after the row's position, or outside its window."""
    visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
    return tl.where(visible, s, float("-inf"))


# The attention kernel's tile-level fast paths: "1" (default) on, "0" off, so a benchmark can time
# both in one process (bench/gpu_check.sh). Read at every launch, never stored.
FAST_PATHS_ENV = "CBKERNELS_ATTN_FAST_PATHS"


def fast_paths_enabled() -> bool:
    value = os.environ.get(FAST_PATHS_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{FAST_PATHS_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32/int64
    cu_seqlens_q_ptr,  # [B + 1] int32/int64
    sinks_ptr,  # [Hq] fp32 (unused unless has_sinks)
    out_ptr,  # [T, Hq, D] (written when num_splits == 1)
    lse_ptr,  # [T, Hq] fp32 (written when store_lse and num_splits == 1)
    part_o_ptr,  # [num_splits, T, Hq, D_PAD] fp32 (written when num_splits > 1)
    part_lse_ptr,  # [num_splits, T, Hq] fp32, base-2 log-sum-exp of each segment
    batch,
    num_tokens,
    num_q_heads,
    group,  # Hq // Hkv
    head_dim,
    stride_q_tok,  # Hq * D
    stride_kv_slot,  # Hkv * D: one token of one cache block
    stride_table,  # max_blocks
    log2_block_size,
    scale_log2,  # scale * log2(e)
    softcap_scale,  # scale / softcap; 0: softcap off
    softcap_log2,  # softcap * log2(e)
    sliding_window,  # 0: off
    has_sinks,
    store_lse,
    num_splits,
    one_tile_per_seq,  # 1 when max_seqlen_q * group <= BLOCK_M: program pid serves sequence pid
    k_scale_ptr,  # fp8 caches: [] or [Hkv] fp32, dequantized = stored * scale
    v_scale_ptr,
    scale_stride,  # 0: one scale per tensor, 1: one per KV head
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: full-precision dots (no tf32)
    UPCAST: tl.constexpr,  # interpreter + bf16 only: compute on fp32 copies of the tiles
    KV_FP8: tl.constexpr,  # fp8 cache: tiles converted (exactly) to q's dtype, scales folded in
    FAST_PATHS: tl.constexpr,  # interior KV tiles unmasked; False: every tile masked (the kernel as it was)
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Sequence of this virtual tile: the last b with vstart(b) <= pid, where vstart(b) is
    # (cu[b] * group) // BLOCK_M + b, or just b when every sequence fits one tile (decodes).
    tiles_mul = 1 - one_tile_per_seq
    lo_b = tl.where(one_tile_per_seq != 0, pid, 0)
    hi_b = tl.where(one_tile_per_seq != 0, pid + 1, batch)
    while hi_b - lo_b > 1:
        mid = (lo_b + hi_b) // 2
        start_mid = tl.load(cu_seqlens_q_ptr + mid).to(tl.int32)
        before = (start_mid * group) // BLOCK_M * tiles_mul + mid <= pid
        lo_b = tl.where(before, mid, lo_b)
        hi_b = tl.where(before, hi_b, mid)
    seq = lo_b
    q_start = tl.load(cu_seqlens_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1).to(tl.int32) - q_start
    tile = pid - ((q_start * group) // BLOCK_M * tiles_mul + seq)
    row_start = tile * BLOCK_M  # first flattened row of this tile inside the sequence
    if row_start >= q_len * group:
        return
    kv_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    first_pos = kv_len - q_len  # absolute position of the sequence's first query row

    rows = row_start + tl.arange(0, BLOCK_M)
    row_tok = rows // group  # query token inside the sequence
    row_head = kv_head * group + rows % group  # query head
    row_ok = rows < q_len * group
    q_pos = first_pos + row_tok  # [BLOCK_M]
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < head_dim

    q_tok = (q_start + row_tok).to(tl.int64)
    q_offs = q_tok[:, None] * stride_q_tok + row_head.to(tl.int64)[:, None] * head_dim + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)

    # Key range of the tile: causal upper end from its last row, window lower end from its first.
    last_tok = tl.minimum(row_start + BLOCK_M, q_len * group) - 1
    hi = first_pos + last_tok // group + 1
    # No window: one wider than any sequence, so the window test below always passes.
    window = tl.where(sliding_window > 0, sliding_window, kv_len + 1)
    lo = tl.maximum(first_pos + row_start // group - window + 1, 0)
    tile_lo = lo // BLOCK_N
    n_tiles = tl.cdiv(hi, BLOCK_N) - tile_lo
    per_split = tl.cdiv(n_tiles, num_splits)
    it_begin = tile_lo + split * per_split
    it_end = tl.minimum(it_begin + per_split, tile_lo + n_tiles)

    if KV_FP8:
        # One KV head per program, so both scales are scalars: K's folds into the logit scale
        # (q . (k * s) = (q . k) * s), V's into the output (sum p (v * s) = s * sum p v).
        k_scale = tl.load(k_scale_ptr + kv_head * scale_stride)
        scale_log2 = scale_log2 * k_scale
        softcap_scale = softcap_scale * k_scale
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    block_mask = (1 << log2_block_size) - 1
    kv_head_off = kv_head.to(tl.int64) * head_dim
    # Fast path: interior tiles [int_lo, int_hi) are seen in full by every row of the program (at
    # or below the first row's causal limit, inside the last row's window, hence inside the
    # sequence), so the (row, key) visibility test and its select are skipped; only the tiles at
    # the window start, the causal diagonal and the sequence end pay for them. One loop body with
    # a uniform branch, not a second (masked) loop: two bodies made ptxas spill on sm_80, and so
    # did a scalar block-table read per tile (docs/kernels.md).
    if FAST_PATHS:
        int_lo = tl.maximum(it_begin, tl.cdiv(tl.maximum(first_pos + last_tok // group - window + 1, 0), BLOCK_N))
        int_hi = tl.minimum(it_end, (first_pos + row_start // group + 1) // BLOCK_N)
    # LOOP_RANGE, not range(): Triton 3.6's interpreter cannot take a tensor as a range() bound
    # (paged_attention_tiles.version_choices). Compiled, LOOP_RANGE is tl.range: the same loop.
    for it in LOOP_RANGE(it_begin, it_end):
        k_pos = it * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_ok = k_pos < kv_len
        # Entries past the sequence's last block are garbage: masked, never dereferenced.
        block = tl.load(table_row + (k_pos >> log2_block_size), mask=k_ok, other=0).to(tl.int64)
        slot = (block << log2_block_size) + (k_pos & block_mask)
        kv_offs = slot * stride_kv_slot + kv_head_off  # [BLOCK_N] int64
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        v = tl.load(v_cache_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        elif KV_FP8:  # every fp8 number is exact in fp16, bf16 and fp32
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if softcap_scale > 0:
            # c * tanh(x / c) with tanh(|y|) = (1 - e) / (1 + e), e = exp2(-2 |y| log2 e) in (0, 1].
            y = qk * softcap_scale
            e = tl.exp2(tl.abs(y) * _NEG_TWO_LOG2E)
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(y < 0, -t, t) * softcap_log2
        else:
            s = qk * scale_log2
        if FAST_PATHS:
            if (it < int_lo) | (it >= int_hi):  # a boundary tile
                s = _mask_scores(s, k_pos, k_ok, q_pos, window)
        else:
            s = _mask_scores(s, k_pos, k_ok, q_pos, window)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr + kv_head * scale_stride)
    out_row = q_tok * num_q_heads + row_head  # [BLOCK_M] index into [T, Hq]
    if num_splits == 1:
        if has_sinks:
            sink = tl.load(sinks_ptr + row_head, mask=row_ok, other=0.0) * _LOG2E
            m_fin = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_fin)
            l_i = l_i * alpha + tl.exp2(sink - m_fin)
            acc = acc * alpha[:, None]
            m_i = m_fin
        o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]  # l = 0 only on padding rows (not stored)
        tl.store(out_ptr + out_row[:, None] * head_dim + dims[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])
        if store_lse:
            tl.store(lse_ptr + out_row, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)
    else:
        # An empty segment (l = 0) writes o = 0 and lse = -inf, which the merge weighs as 0.
        o = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
        part_row = split.to(tl.int64) * num_tokens * num_q_heads + out_row
        tl.store(part_o_ptr + part_row[:, None] * D_PAD + dims[None, :], o, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part_row, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr,  # [num_splits, T, Hq, D_PAD] fp32
    part_lse_ptr,  # [num_splits, T, Hq] fp32, base 2
    sinks_ptr,  # [Hq] fp32
    out_ptr,  # [T, Hq, D]
    lse_ptr,  # [T, Hq] fp32
    num_rows,  # T * Hq
    num_q_heads,
    head_dim,
    has_sinks,
    store_lse,
    num_splits,
    D_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # flattened (token, q head)
    dims = tl.arange(0, D_PAD)
    m = tl.full([], _NEG_BIG, tl.float32)
    denom = tl.zeros([], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for s in LOOP_RANGE(num_splits):  # not range(): see the KV loop of _paged_attention_kernel
        part = s * num_rows + row
        lse_s = tl.load(part_lse_ptr + part)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse_s - m_new)
        acc = acc * alpha + w * tl.load(part_o_ptr + part * D_PAD + dims)
        denom = denom * alpha + w
        m = m_new
    if has_sinks:
        sink = tl.load(sinks_ptr + row % num_q_heads) * _LOG2E
        m_new = tl.maximum(m, sink)
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha
        denom = denom * alpha + tl.exp2(sink - m_new)
        m = m_new
    tl.store(out_ptr + row * head_dim + dims, (acc / denom).to(out_ptr.dtype.element_ty), mask=dims < head_dim)
    if store_lse:
        tl.store(lse_ptr + row, (m + tl.log2(denom)) * _LN2)


def launch_paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32 (other index dtypes are converted: one extra copy)
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32 (likewise)
    out: torch.Tensor,  # [T, Hq, D], written
    lse: torch.Tensor | None,  # [T, Hq] fp32, written when given
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,  # [Hq]
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    num_splits: int | None = None,
    workspace: torch.Tensor | None = None,  # fp32, >= plan.workspace_numel(T, Hq) elements
    k_scale: torch.Tensor | None = None,  # fp8 caches: [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
) -> None:
    """Launch on inputs the caller has validated. ``num_splits`` forces the split-KV count
    (None: ``pick_num_splits``). Split partials go to ``workspace`` when given (a caller that
    captures CUDA graphs passes a buffer that outlives them, sized with ``plan_launch``),
    else to a fresh allocation."""
    fast_paths = fast_paths_enabled()  # a bad value fails before any work
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return
    # One index width for the kernel: the compile gate then covers every specialisation the
    # launcher can pick. The engine hands int32, so these are no-ops on its path.
    if seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.to(torch.int32)
    if cu_seqlens_q.dtype != torch.int32:
        cu_seqlens_q = cu_seqlens_q.to(torch.int32)
    if max_seqlen_q is None or max_seqlen_k is None:  # one device-to-host sync; engines pass both
        longest = torch.stack([(cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().to(torch.int64),
                               seq_lens.max().to(torch.int64)]).tolist()
        max_seqlen_q = longest[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = longest[1] if max_seqlen_k is None else max_seqlen_k
    if max_seqlen_q == 0:
        return

    plan = plan_launch(q.device, q.dtype, num_tokens, batch, num_q_heads, num_kv_heads, head_dim,
                       max_seqlen_q, max_seqlen_k, num_splits)
    tile, d_pad, splits = plan.tile, plan.d_pad, plan.num_splits
    upcast = interpreting() and q.dtype == torch.bfloat16
    fp8 = k_cache.dtype in FP8_FORMATS
    # The interpreter truncates fp32 -> bf16 stores; write fp32 there and let torch round.
    target = torch.empty(out.shape, dtype=torch.float32, device=out.device) if upcast else out

    sinks_f = (sinks.to(torch.float32) if sinks is not None
               else torch.zeros(1, dtype=torch.float32, device=q.device))
    lse_buf = lse if lse is not None else sinks_f
    if splits > 1:
        rows = num_tokens * num_q_heads
        numel = plan.workspace_numel(num_tokens, num_q_heads)
        if workspace is None:
            workspace = torch.empty(numel, dtype=torch.float32, device=q.device)
        elif workspace.dtype != torch.float32 or workspace.numel() < numel:
            raise ValueError(f"workspace must hold >= {numel} float32 elements for {splits} splits, "
                             f"got {workspace.numel()} {workspace.dtype}")
        part_o = workspace[: splits * rows * d_pad]
        part_lse = workspace[splits * rows * d_pad: numel]
    else:
        part_o = part_lse = sinks_f  # never touched

    _paged_attention_kernel[(plan.grid_m, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, sinks_f, target, lse_buf,
        part_o, part_lse,
        batch, num_tokens, num_q_heads, num_q_heads // num_kv_heads, head_dim,
        q.stride(0), k_cache.stride(1), block_tables.stride(0), int(math.log2(k_cache.shape[1])),
        float(scale) * LOG2E, float(scale) / softcap if softcap else 0.0, float(softcap or 0.0) * LOG2E,
        int(sliding_window or 0),
        int(sinks is not None), int(lse is not None), splits,
        int(max_seqlen_q * (num_q_heads // num_kv_heads) <= tile.block_m),
        k_scale if fp8 else sinks_f, v_scale if fp8 else sinks_f, int(fp8 and k_scale.dim() == 1),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, D_PAD=d_pad,
        IEEE_DOT=q.dtype == torch.float32 or upcast, UPCAST=upcast, KV_FP8=fp8,
        FAST_PATHS=fast_paths and tile.fast_paths,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens * num_q_heads,)](
            part_o, part_lse, sinks_f, target, lse_buf, num_tokens * num_q_heads, num_q_heads, head_dim,
            int(sinks is not None), int(lse is not None), splits, D_PAD=d_pad, num_warps=MERGE_NUM_WARPS,
            num_stages=MERGE_NUM_STAGES,
        )
    if upcast:
        out.copy_(target)

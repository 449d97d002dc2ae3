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
  log2-sum-exp) into a cached per-device scratch; ``_merge_splits_kernel`` combines them.
* Softmax runs in base 2 with ``log2(e)`` folded into the scale; softcap uses a tanh built
  from ``exp2`` of a non-positive argument, which cannot overflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cbkernels._validation import prepare_paged_attention

from ._common import AotConfig, interpreting, next_power_of_2

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

# Head dims below 64 (validation allows 16..56) run on the D = 64 tiles, masked: small heads are
# rare (test models) and it keeps the AOT config count at three head-dim pads (64, 128, 256).
MIN_D_PAD = 64
# Smallest M of tl.dot on tensor cores (mma.sync m16n8k16): decode tiles pad up to it.
DECODE_BLOCK_M = 16


@dataclass(frozen=True)
class Tile:
    block_m: int  # flattened (token, head_in_group) rows per program
    block_n: int  # keys per KV tile
    num_warps: int
    num_stages: int


# Launch tiles per arch, keyed by (kind, element size, padded head dim). Where the numbers came
# from (every entry checked in the AOT table, python -m cbkernels.aot --kernel paged_attention,
# which compiles every config for BOTH sm_80 and sm_90, so an entry must fit both):
# * decode BLOCK_M 16 is the mma.sync minimum (m16n8k16); decode is bandwidth-bound, so larger
#   M would only waste MMA. BLOCK_N 64 at 2-byte D <= 128: 79-164 registers, 20-38 KB smem.
# * prefill BLOCK_M 128 at D = 64 reaches wgmma on sm_90 (>= 64 rows, TRITON_ON_CPU.md) at 154
#   registers. At D = 128, M = 128 spilled on sm_80 (255 registers + 20 B spills: mma.sync keeps
#   the whole accumulator in registers) and sat at 238 on sm_90, so M = 64 (146-188 registers).
# * D = 256 halves N (and M for decode stays 16): the 256-wide K/V tiles double smem and regs.
# * fp32 inputs run IEEE dots on FMA units, no MMA: M = 64 spilled on sm_80 (420 B at 4 warps),
#   M = 32 fits (107-154 registers); D = 256 halves M again.
# * num_stages: 3 on sm_90, whose 227 KB smem (cbkernels.aot.SHARED_MEMORY_LIMIT) holds a third
#   K/V buffer for the D <= 128 fp16/bf16 decode and D = 64 prefill tiles (<= 49 KB); 2 on sm_80
#   (163 KB, and its cp.async pipeline gains little from a third stage on a gather).
def _tiles(arch: int) -> dict[tuple[str, int, int], Tile]:
    stages = 3 if arch >= 90 else 2
    return {
        ("decode", 2, 64): Tile(DECODE_BLOCK_M, 64, 4, stages),
        ("decode", 2, 128): Tile(DECODE_BLOCK_M, 64, 4, stages),
        ("decode", 2, 256): Tile(DECODE_BLOCK_M, 32, 4, 2),
        ("decode", 4, 64): Tile(DECODE_BLOCK_M, 32, 4, 2),
        ("decode", 4, 128): Tile(DECODE_BLOCK_M, 32, 4, 2),
        ("decode", 4, 256): Tile(DECODE_BLOCK_M, 16, 4, 2),
        ("prefill", 2, 64): Tile(128, 64, 8, stages),
        ("prefill", 2, 128): Tile(64, 64, 8, 2),
        ("prefill", 2, 256): Tile(64, 32, 8, 2),
        ("prefill", 4, 64): Tile(32, 32, 4, 2),
        ("prefill", 4, 128): Tile(32, 32, 8, 2),
        ("prefill", 4, 256): Tile(16, 32, 8, 2),
    }


TILES = {80: _tiles(80), 90: _tiles(90)}
# Archs newer than sm_90 reuse the sm_90 table; older ones (and the interpreter, which mirrors
# an H100's decisions) pick by the nearest entry at or below.
INTERPRETER_ARCH = 90

# Split-KV heuristic. The number of SMs of an H100 SXM stands in for the device when
# interpreting on CPU, so CPU runs take the decisions an H100 would.
INTERPRETER_SM_COUNT = 132
# Split only when the (q tile x KV head) programs fill less than this many waves of SMs: one
# program per SM leaves most of the bandwidth idle on a decode (flash-decoding's motivation).
SPLIT_WAVES_TARGET = 2
# Each segment keeps at least this many keys, so the extra partial write (D fp32 per row) and
# merge stay small next to the K/V bytes a segment streams (256 keys x D x 2 arrays).
SPLIT_MIN_KEYS = 256
# Upper bound on segments: beyond 16 the merge kernel's loop and scratch traffic outgrow the
# gain (a 132-SM GPU is filled by 16 splits of 8+ programs).
MAX_SPLITS = 16
# Scratch for partials is capped (fp32 acc + lse per split and row); wider batches do not split.
SPLIT_SCRATCH_MAX_BYTES = 512 * 1024 * 1024
# Tests and benchmarks may force a split count (None: use the heuristic).
NUM_SPLITS_OVERRIDE: int | None = None

# Merge kernel: one (token, q head) per program, 4 warps cover a 256-wide head row in one pass.
MERGE_NUM_WARPS = 4


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: full-precision dots (no tf32)
    UPCAST: tl.constexpr,  # interpreter + bf16 only: compute on fp32 copies of the tiles
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

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    block_mask = (1 << log2_block_size) - 1
    kv_head_off = kv_head.to(tl.int64) * head_dim
    for it in range(it_begin, it_end):
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
        visible = (k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
                   & (k_pos[None, :] > q_pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
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
    for s in range(num_splits):
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


# --------------------------------------------------------------------------- launch heuristics
def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_ARCH
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major * 10 + minor >= 90 else 80


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def padded_head_dim(head_dim: int) -> int:
    """Next power of two, at least MIN_D_PAD (masked lanes cost little next to another config)."""
    return max(next_power_of_2(head_dim), MIN_D_PAD)


def pick_tile(arch: int, dtype: torch.dtype, head_dim: int, max_seqlen_q: int, group: int) -> Tile:
    """Decode tile (M = 16) when one sequence's rows x heads fit in it, else the prefill tile."""
    kind = "decode" if max_seqlen_q * group <= DECODE_BLOCK_M else "prefill"
    size = 4 if dtype == torch.float32 else 2
    return TILES[arch][(kind, size, padded_head_dim(head_dim))]


def num_virtual_tiles(num_tokens: int, batch: int, group: int, block_m: int, max_seqlen_q: int) -> int:
    """Grid axis 0, from host ints only: ``batch`` when every sequence fits one tile, else the
    bound ``cdiv(T * group, BLOCK_M) + B`` of the module docstring."""
    if max_seqlen_q * group <= block_m:
        return batch
    return triton.cdiv(num_tokens * group, block_m) + batch


def pick_num_splits(programs: int, max_seqlen_k: int, sm_count: int, scratch_bytes_per_split: int) -> int:
    """Segments per q tile: split only while (q tiles x KV heads) programs fill fewer than
    SPLIT_WAVES_TARGET waves of the SMs, keeping SPLIT_MIN_KEYS keys per segment, at most
    MAX_SPLITS, within SPLIT_SCRATCH_MAX_BYTES of partials."""
    if NUM_SPLITS_OVERRIDE is not None:
        return NUM_SPLITS_OVERRIDE
    target = sm_count * SPLIT_WAVES_TARGET
    if programs <= 0 or programs >= target:
        return 1
    splits = min(triton.cdiv(target, programs), max_seqlen_k // SPLIT_MIN_KEYS, MAX_SPLITS)
    splits = min(splits, SPLIT_SCRATCH_MAX_BYTES // max(scratch_bytes_per_split, 1))
    return max(splits, 1)


# Split-KV scratch, one flat fp32 buffer per device, grown on demand and then reused, so that
# steady-state launches (and CUDA-graph replays) allocate nothing. Run one eager step of the
# largest batch before capturing a graph, so that the buffer is not first grown during capture.
# One buffer per device assumes launches on that device are stream-ordered (one stream).
_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device, numel: int) -> torch.Tensor:
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        _SCRATCH[device] = buf
    return buf[:numel]


def launch_paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32/int64
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32/int64
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
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return
    group = num_q_heads // num_kv_heads
    # One index width for the kernel: the compile gate then covers every specialisation the
    # launcher can pick (no-ops for int32 inputs; lengths never approach 2**31).
    seq_lens, cu_seqlens_q = seq_lens.to(torch.int32), cu_seqlens_q.to(torch.int32)
    if max_seqlen_q is None or max_seqlen_k is None:  # one device-to-host sync; engines pass both
        longest = torch.stack([(cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().to(torch.int64),
                               seq_lens.max().to(torch.int64)]).tolist()
        max_seqlen_q = longest[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = longest[1] if max_seqlen_k is None else max_seqlen_k
    if max_seqlen_q == 0:
        return

    arch = _arch(q.device)
    tile = pick_tile(arch, q.dtype, head_dim, max_seqlen_q, group)
    d_pad = padded_head_dim(head_dim)
    grid_m = num_virtual_tiles(num_tokens, batch, group, tile.block_m, max_seqlen_q)
    if num_splits is None:
        num_splits = pick_num_splits(grid_m * num_kv_heads, max_seqlen_k, _sm_count(q.device),
                                     num_tokens * num_q_heads * (d_pad + 1) * 4)
    upcast = interpreting() and q.dtype == torch.bfloat16
    # The interpreter truncates fp32 -> bf16 stores; write fp32 there and let torch round.
    target = torch.empty(out.shape, dtype=torch.float32, device=out.device) if upcast else out

    sinks_f = (sinks.to(torch.float32) if sinks is not None
               else torch.zeros(1, dtype=torch.float32, device=q.device))
    lse_buf = lse if lse is not None else sinks_f
    if num_splits > 1:
        rows = num_tokens * num_q_heads
        buf = _scratch(q.device, num_splits * rows * (d_pad + 1))
        part_o = buf[: num_splits * rows * d_pad]
        part_lse = buf[num_splits * rows * d_pad:]
    else:
        part_o = part_lse = sinks_f  # never touched

    _paged_attention_kernel[(grid_m, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, sinks_f, target, lse_buf,
        part_o, part_lse,
        batch, num_tokens, num_q_heads, group, head_dim,
        q.stride(0), k_cache.stride(1), block_tables.stride(0), int(math.log2(block_size)),
        float(scale) * LOG2E, float(scale) / softcap if softcap else 0.0, float(softcap or 0.0) * LOG2E,
        int(sliding_window or 0),
        int(sinks is not None), int(lse is not None), num_splits,
        int(max_seqlen_q * group <= tile.block_m), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, D_PAD=d_pad,
        IEEE_DOT=q.dtype == torch.float32 or upcast, UPCAST=upcast,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens * num_q_heads,)](
            part_o, part_lse, sinks_f, target, lse_buf, num_tokens * num_q_heads, num_q_heads, head_dim,
            int(sinks is not None), int(lse is not None), num_splits, D_PAD=d_pad, num_warps=MERGE_NUM_WARPS,
        )
    if upcast:
        out.copy_(target)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int
    cu_seqlens_q: torch.Tensor,  # [B + 1] int
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [Hq]
    out: torch.Tensor | None = None,  # [T, Hq, D]
    return_lse: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
):
    """Validate, allocate, launch: ``out [T, Hq, D]`` (and ``lse [T, Hq]`` fp32 when asked)."""
    scale, out, lse = prepare_paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale=scale,
        sliding_window=sliding_window, softcap=softcap, sinks=sinks, out=out, return_lse=return_lse,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )
    launch_paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, lse, scale=scale,
        sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- AOT configs
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _attention_signature(dtype: str, index: str) -> dict[str, str]:
    return {
        "q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
        "block_tables_ptr": "*i32", "seq_lens_ptr": f"*{index}", "cu_seqlens_q_ptr": f"*{index}",
        "sinks_ptr": "*fp32", "out_ptr": f"*{dtype}", "lse_ptr": "*fp32",
        "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
        "batch": "i32", "num_tokens": "i32", "num_q_heads": "i32", "group": "i32", "head_dim": "i32",
        "stride_q_tok": "i32", "stride_kv_slot": "i32", "stride_table": "i32", "log2_block_size": "i32",
        "scale_log2": "fp32", "softcap_scale": "fp32", "softcap_log2": "fp32", "sliding_window": "i32", "has_sinks": "i32",
        "store_lse": "i32", "num_splits": "i32", "one_tile_per_seq": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D_PAD": "constexpr",
        "IEEE_DOT": "constexpr", "UPCAST": "constexpr",
    }


def aot_configs() -> list[AotConfig]:
    """Every (dtype, head-dim pad, tile) the launcher can pick on sm_80 and sm_90, plus the merge.

    The launcher hands seq_lens / cu_seqlens_q to the kernel as int32 whatever their input
    dtype, so int32 is the only index specialisation. Head dims divisible by 16 (64, 96 as D,
    128, 256) are hinted as the JIT would see them.
    """
    configs = []
    for arch in sorted(TILES):
        for (kind, size, d_pad), tile in TILES[arch].items():
            dtypes = (torch.float32,) if size == 4 else (torch.float16, torch.bfloat16)
            for dtype in dtypes:
                name = _TRITON_DTYPE[dtype]
                configs.append(AotConfig(
                    f"paged_attention[{kind},{name},d{d_pad},m{tile.block_m},n{tile.block_n},"
                    f"w{tile.num_warps},s{tile.num_stages}]",
                    _paged_attention_kernel, _attention_signature(name, "i32"),
                    {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "D_PAD": d_pad,
                     "IEEE_DOT": dtype == torch.float32, "UPCAST": False},
                    tile.num_warps, tile.num_stages,
                    divisible=("head_dim", "stride_q_tok", "stride_kv_slot"), archs=(arch,),
                ))
    for dtype, name in _TRITON_DTYPE.items():
        for d_pad in (64, 128, 256):
            configs.append(AotConfig(
                f"merge_splits[{name},d{d_pad}]", _merge_splits_kernel,
                {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "sinks_ptr": "*fp32", "out_ptr": f"*{name}",
                 "lse_ptr": "*fp32", "num_rows": "i32", "num_q_heads": "i32", "head_dim": "i32",
                 "has_sinks": "i32", "store_lse": "i32", "num_splits": "i32", "D_PAD": "constexpr"},
                {"D_PAD": d_pad}, MERGE_NUM_WARPS, divisible=("head_dim",),
            ))
    return configs

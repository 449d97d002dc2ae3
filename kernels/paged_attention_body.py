"""One KV tile of the paged-attention kernel, as a jit function the kernel's loops inline.

Two compile-time variants keep the common case lean:
* ``MASKED``: boundary tiles (the causal diagonal, the window's first tile, a sequence's
  partial last tile) test every (row, key) pair and mask loads past the sequence; interior
  tiles, visible in full to every row of the program, skip the masks and the selects.
* ``TABLE_ONCE``: when a tile lies inside one cache block (block_size >= BLOCK_N), the block
  table is read once for the tile, a scalar, instead of once per key.
"""
from __future__ import annotations

import triton
import triton.language as tl

_NEG_TWO_LOG2E = tl.constexpr(-2.0 * 1.4426950408889634)


@triton.jit
def attend_tile(
    it, q, m_i, l_i, acc, table_row, k_cache_ptr, v_cache_ptr, kv_len, q_pos, window, log2_block_size,
    stride_kv_slot, kv_head_off, dims, dim_ok, scale_log2, softcap_scale, softcap_log2,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr, TABLE_ONCE: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr, KV_FP8: tl.constexpr,
):
    k_pos = it * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    k_ok = k_pos < kv_len
    if TABLE_ONCE:
        # A visited tile starts below kv_len, so its block's entry is a real one.
        block = tl.load(table_row + ((it * BLOCK_N) >> log2_block_size)).to(tl.int64)
    elif MASKED:
        # Entries past the sequence's last block are garbage: masked, never dereferenced.
        block = tl.load(table_row + (k_pos >> log2_block_size), mask=k_ok, other=0).to(tl.int64)
    else:
        block = tl.load(table_row + (k_pos >> log2_block_size)).to(tl.int64)
    slot = (block << log2_block_size) + (k_pos & ((1 << log2_block_size) - 1))
    kv_offs = slot * stride_kv_slot + kv_head_off  # [BLOCK_N] int64
    if MASKED:
        kv_mask = k_ok[:, None] & dim_ok[None, :]
    else:
        kv_mask = tl.broadcast_to(dim_ok[None, :], [BLOCK_N, D_PAD])
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
    if MASKED:
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
    return m_new, l_i, acc

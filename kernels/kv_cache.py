"""KV-cache scatter (write new K/V into their slots), gather (read a paged history out as a
packed tensor) and block copy (copy-on-write of shared prefix blocks).

All three are bandwidth-bound copies. A cache row (one token: ``Hkv * head_dim`` elements) is
contiguous, so each program moves a ``[ROWS, COLS]`` tile: ROWS tokens by COLS row elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AotConfig, as_bits, next_power_of_2

# Tokens per program. 16 keeps a tile at <= 8 K elements (16 x 512) so a 4-warp program holds
# it in 64 registers a thread; larger tiles only raise register pressure for a pure copy.
COPY_ROWS = 16
# Row elements per program: at most 1 KB of a row (512 fp16 / 256 fp32 elements), long enough
# for 16-byte vector loads on every lane; wider rows are split over grid axis 1. A 2 KB fp32
# tile compiled to 180 registers a thread (AOT table) against 86 for 1 KB. Narrow rows use a
# smaller tile, never below 128 (4 warps x 32 lanes).
COPY_COLS_MIN, COPY_TILE_BYTES = 128, 1024
COPY_NUM_WARPS = 4
# copy_blocks: one (src, dst) pair per program along axis 0, the flattened block chunked along
# axis 1. 4096 elements = 16 per thread at 8 warps: 2-4 vector loads in flight per thread.
BLOCK_COPY_CHUNK = 4096
BLOCK_COPY_NUM_WARPS = 8


@triton.jit
def _scatter_kv_kernel(
    key_ptr,  # [T, row]            row = Hkv * head_dim, contiguous
    value_ptr,  # [T, row]
    k_cache_ptr,  # [num_slots, row]  num_slots = num_blocks * block_size
    v_cache_ptr,  # [num_slots, row]
    slot_ptr,  # [T] int32/int64, < 0 skips the token
    num_tokens,
    row_elems,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
    token_ok = tokens < num_tokens
    slots = tl.load(slot_ptr + tokens, mask=token_ok, other=-1).to(tl.int64)
    mask = ((slots >= 0) & token_ok)[:, None] & (cols < row_elems)[None, :]
    src = tokens[:, None] * row_elems + cols[None, :]
    dst = slots[:, None] * row_elems + cols[None, :]
    tl.store(k_cache_ptr + dst, tl.load(key_ptr + src, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(value_ptr + src, mask=mask), mask=mask)


@triton.jit
def _gather_kv_kernel(
    k_cache_ptr,  # [num_slots, row]
    v_cache_ptr,  # [num_slots, row]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int
    cu_seqlens_ptr,  # [B + 1] int32, output row offset of each sequence
    keys_ptr,  # [sum(seq_lens), row]
    values_ptr,  # [sum(seq_lens), row]
    row_elems,
    block_table_stride,
    block_size,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    seq = tl.program_id(0)
    pos = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(2).to(tl.int64) * COLS + tl.arange(0, COLS)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    if tl.program_id(1) * ROWS >= seq_len:
        return
    pos_ok = pos < seq_len
    table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    blocks = tl.load(table_row + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
    slots = blocks * block_size + pos % block_size
    mask = pos_ok[:, None] & (cols < row_elems)[None, :]
    src = slots[:, None] * row_elems + cols[None, :]
    out_rows = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + pos
    dst = out_rows[:, None] * row_elems + cols[None, :]
    tl.store(keys_ptr + dst, tl.load(k_cache_ptr + src, mask=mask), mask=mask)
    tl.store(values_ptr + dst, tl.load(v_cache_ptr + src, mask=mask), mask=mask)


@triton.jit
def _copy_blocks_kernel(
    k_cache_ptr,  # [num_blocks, block_elems]  block_elems = block_size * Hkv * head_dim
    v_cache_ptr,  # [num_blocks, block_elems]
    mapping_ptr,  # [N, 2] int (src, dst)
    block_elems,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    src_block = tl.load(mapping_ptr + 2 * pair).to(tl.int64)
    dst_block = tl.load(mapping_ptr + 2 * pair + 1).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    src = src_block * block_elems + offs
    dst = dst_block * block_elems + offs
    tl.store(k_cache_ptr + dst, tl.load(k_cache_ptr + src, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_cache_ptr + src, mask=mask), mask=mask)


def _cols_tile(row_elems: int, element_size: int) -> int:
    return min(max(next_power_of_2(row_elems), COPY_COLS_MIN), COPY_TILE_BYTES // element_size)


def launch_scatter_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64
) -> None:
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row_elems = key.shape[1] * key.shape[2]
    cols = _cols_tile(row_elems, key.element_size())
    grid = (triton.cdiv(num_tokens, COPY_ROWS), triton.cdiv(row_elems, cols))
    _scatter_kv_kernel[grid](
        as_bits(key), as_bits(value), as_bits(k_cache), as_bits(v_cache), slot_mapping,
        num_tokens, row_elems, ROWS=COPY_ROWS, COLS=cols, num_warps=COPY_NUM_WARPS,
    )


def launch_gather_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32/int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    batch = seq_lens.shape[0]
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=k_cache.device)
    cu_seqlens[1:] = torch.cumsum(seq_lens, 0)
    # The output size is data-dependent: one host sync, as for any gather.
    total = int(cu_seqlens[-1]) if batch else 0
    keys = k_cache.new_empty((total, num_kv_heads, head_dim))
    values = v_cache.new_empty((total, num_kv_heads, head_dim))
    if total == 0:
        return keys, values, cu_seqlens
    longest = int(seq_lens.max())
    row_elems = num_kv_heads * head_dim
    cols = _cols_tile(row_elems, k_cache.element_size())
    grid = (batch, triton.cdiv(longest, COPY_ROWS), triton.cdiv(row_elems, cols))
    _gather_kv_kernel[grid](
        as_bits(k_cache), as_bits(v_cache), block_tables, seq_lens, cu_seqlens,
        as_bits(keys), as_bits(values), row_elems, block_tables.stride(0),
        block_size, ROWS=COPY_ROWS, COLS=cols, num_warps=COPY_NUM_WARPS,
    )
    return keys, values, cu_seqlens


def launch_copy_blocks(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_mapping: torch.Tensor,  # [N, 2] int (src, dst)
) -> None:
    if block_mapping.shape[0] == 0:
        return
    block_elems = k_cache[0].numel()
    grid = (block_mapping.shape[0], triton.cdiv(block_elems, BLOCK_COPY_CHUNK))
    _copy_blocks_kernel[grid](
        as_bits(k_cache), as_bits(v_cache), block_mapping, block_elems,
        CHUNK=BLOCK_COPY_CHUNK, num_warps=BLOCK_COPY_NUM_WARPS,
    )


def aot_configs() -> list[AotConfig]:
    """Every specialisation the launchers above can pick (bit widths x index dtypes x tiles)."""
    configs = []
    for bits, width in (("i16", 2), ("i32", 4)):  # fp16/bf16 and fp32 caches, as integer views
        tiles = []
        cols = COPY_COLS_MIN
        while cols <= COPY_TILE_BYTES // width:
            tiles.append(cols)
            cols *= 2
        for index in ("i32", "i64"):
            for cols in tiles:
                configs.append(AotConfig(
                    f"scatter_kv[{bits},slot={index},cols={cols}]", _scatter_kv_kernel,
                    {"key_ptr": f"*{bits}", "value_ptr": f"*{bits}", "k_cache_ptr": f"*{bits}",
                     "v_cache_ptr": f"*{bits}", "slot_ptr": f"*{index}", "num_tokens": "i32",
                     "row_elems": "i32", "ROWS": "constexpr", "COLS": "constexpr"},
                    {"ROWS": COPY_ROWS, "COLS": cols}, COPY_NUM_WARPS, divisible=("row_elems",),
                ))
                configs.append(AotConfig(
                    f"gather_kv[{bits},seq_lens={index},cols={cols}]", _gather_kv_kernel,
                    {"k_cache_ptr": f"*{bits}", "v_cache_ptr": f"*{bits}", "block_tables_ptr": "*i32",
                     "seq_lens_ptr": f"*{index}", "cu_seqlens_ptr": "*i32", "keys_ptr": f"*{bits}",
                     "values_ptr": f"*{bits}", "row_elems": "i32", "block_table_stride": "i32",
                     "block_size": "i32", "ROWS": "constexpr", "COLS": "constexpr"},
                    {"ROWS": COPY_ROWS, "COLS": cols}, COPY_NUM_WARPS, divisible=("row_elems", "block_size"),
                ))
            configs.append(AotConfig(
                f"copy_blocks[{bits},mapping={index}]", _copy_blocks_kernel,
                {"k_cache_ptr": f"*{bits}", "v_cache_ptr": f"*{bits}", "mapping_ptr": f"*{index}",
                 "block_elems": "i32", "CHUNK": "constexpr"},
                {"CHUNK": BLOCK_COPY_CHUNK}, BLOCK_COPY_NUM_WARPS, divisible=("block_elems",),
            ))
    return configs

"""KV-cache scatter (write new K/V into their slots), gather (read a paged history out as a
packed tensor) and block copy (copy-on-write of shared prefix blocks).

All three are bandwidth-bound copies. A cache row (one token: ``Hkv * head_dim`` elements) is
contiguous, so each program moves a ``[ROWS, COLS]`` tile: ROWS tokens by COLS row elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AotConfig, as_bits, interpreting, next_power_of_2
from .fp8 import FP8_FORMATS, round_to_fp8

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
# fp8 scatter / gather convert numbers (no bit views), so one tile width for every row keeps
# the compiled set small: 256 columns x 16 rows = 16 elements a thread at 4 warps.
FP8_COPY_COLS = 256
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
def _gather_addresses(block_tables_ptr, cu_seqlens_ptr, seq, pos, seq_len, cols, row_elems, block_table_stride,
                      block_size):
    """(mask, cache offsets, output offsets) of a gather tile: positions ``pos`` of sequence
    ``seq`` through its block-table row, packed after ``cu_seqlens[seq]`` in the output."""
    pos_ok = pos < seq_len
    table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    blocks = tl.load(table_row + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
    slots = blocks * block_size + pos % block_size
    mask = pos_ok[:, None] & (cols < row_elems)[None, :]
    out_rows = tl.load(cu_seqlens_ptr + seq).to(tl.int64) + pos
    return mask, slots[:, None] * row_elems + cols[None, :], out_rows[:, None] * row_elems + cols[None, :]


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
    mask, src, dst = _gather_addresses(block_tables_ptr, cu_seqlens_ptr, seq, pos, seq_len, cols, row_elems,
                                       block_table_stride, block_size)
    tl.store(keys_ptr + dst, tl.load(k_cache_ptr + src, mask=mask), mask=mask)
    tl.store(values_ptr + dst, tl.load(v_cache_ptr + src, mask=mask), mask=mask)


@triton.jit
def _scatter_kv_fp8_kernel(
    key_ptr,  # [T, row] fp16/bf16/fp32
    value_ptr,  # [T, row]
    k_cache_ptr,  # [num_slots, row] fp8
    v_cache_ptr,  # [num_slots, row] fp8
    slot_ptr,  # [T] int32/int64, < 0 skips the token
    k_scale_ptr,  # [] or [Hkv] fp32
    v_scale_ptr,
    num_tokens,
    row_elems,
    head_dim,
    scale_stride,  # 0: one scale per tensor, 1: one per KV head
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    MAX: tl.constexpr,
    MANT: tl.constexpr,
    EMIN: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
    token_ok = tokens < num_tokens
    col_ok = cols < row_elems
    slots = tl.load(slot_ptr + tokens, mask=token_ok, other=-1).to(tl.int64)
    mask = ((slots >= 0) & token_ok)[:, None] & col_ok[None, :]
    src = tokens[:, None] * row_elems + cols[None, :]
    dst = slots[:, None] * row_elems + cols[None, :]
    head = (cols // head_dim) * scale_stride
    k_scale = tl.load(k_scale_ptr + head, mask=col_ok, other=1.0)[None, :]
    v_scale = tl.load(v_scale_ptr + head, mask=col_ok, other=1.0)[None, :]
    # IEEE division (div_rn): the quotient the reference computes, on every backend.
    k = round_to_fp8(tl.math.div_rn(tl.load(key_ptr + src, mask=mask, other=0.0).to(tl.float32), k_scale),
                     MAX, MANT, EMIN)
    v = round_to_fp8(tl.math.div_rn(tl.load(value_ptr + src, mask=mask, other=0.0).to(tl.float32), v_scale),
                     MAX, MANT, EMIN)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_kv_fp8_kernel(
    k_cache_ptr,  # [num_slots, row] fp8
    v_cache_ptr,  # [num_slots, row] fp8
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int
    cu_seqlens_ptr,  # [B + 1] int32
    k_scale_ptr,  # [] or [Hkv] fp32
    v_scale_ptr,
    keys_ptr,  # [sum(seq_lens), row] fp16/bf16/fp32: stored * scale
    values_ptr,
    row_elems,
    block_table_stride,
    block_size,
    head_dim,
    scale_stride,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    seq = tl.program_id(0)
    pos = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(2).to(tl.int64) * COLS + tl.arange(0, COLS)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    if tl.program_id(1) * ROWS >= seq_len:
        return
    col_ok = cols < row_elems
    mask, src, dst = _gather_addresses(block_tables_ptr, cu_seqlens_ptr, seq, pos, seq_len, cols, row_elems,
                                       block_table_stride, block_size)
    head = (cols // head_dim) * scale_stride
    k_scale = tl.load(k_scale_ptr + head, mask=col_ok, other=1.0)[None, :]
    v_scale = tl.load(v_scale_ptr + head, mask=col_ok, other=1.0)[None, :]
    k = tl.load(k_cache_ptr + src, mask=mask, other=0.0).to(tl.float32) * k_scale
    v = tl.load(v_cache_ptr + src, mask=mask, other=0.0).to(tl.float32) * v_scale
    tl.store(keys_ptr + dst, k.to(keys_ptr.dtype.element_ty), mask=mask)
    tl.store(values_ptr + dst, v.to(values_ptr.dtype.element_ty), mask=mask)


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


def _scale_stride(scale: torch.Tensor) -> int:
    """0 for one scale per tensor (``[]``), 1 for one per KV head (``[Hkv]``)."""
    return 0 if scale.dim() == 0 else 1


def _fp8_constexprs(dtype: torch.dtype) -> dict:
    fmt = FP8_FORMATS[dtype]
    return {"MAX": fmt.max_finite, "MANT": fmt.mantissa_bits, "EMIN": fmt.min_normal_exp}


def launch_scatter_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64
    k_scale: torch.Tensor | None = None,  # fp8 caches: [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
) -> None:
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row_elems = key.shape[1] * key.shape[2]
    if k_cache.dtype in FP8_FORMATS:  # quantize on write: value / scale, saturated, ties to even
        cols = FP8_COPY_COLS
        grid = (triton.cdiv(num_tokens, COPY_ROWS), triton.cdiv(row_elems, cols))
        _scatter_kv_fp8_kernel[grid](
            key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, num_tokens, row_elems,
            key.shape[2], _scale_stride(k_scale), ROWS=COPY_ROWS, COLS=cols, num_warps=COPY_NUM_WARPS,
            **_fp8_constexprs(k_cache.dtype),
        )
        return
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
    k_scale: torch.Tensor | None = None,  # fp8 caches: [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,  # fp8 caches: output dtype (None: float32)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    batch = seq_lens.shape[0]
    fp8 = k_cache.dtype in FP8_FORMATS
    out_dtype = (dtype or torch.float32) if fp8 else k_cache.dtype
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=k_cache.device)
    cu_seqlens[1:] = torch.cumsum(seq_lens, 0)
    # The output size is data-dependent: one host sync, as for any gather.
    total = int(cu_seqlens[-1]) if batch else 0
    keys = k_cache.new_empty((total, num_kv_heads, head_dim), dtype=out_dtype)
    values = v_cache.new_empty((total, num_kv_heads, head_dim), dtype=out_dtype)
    if total == 0:
        return keys, values, cu_seqlens
    longest = int(seq_lens.max())
    row_elems = num_kv_heads * head_dim
    if fp8:
        # The interpreter truncates fp32 -> bf16 stores: write fp32 there and let torch round.
        upcast = interpreting() and out_dtype == torch.bfloat16
        k_out = torch.empty_like(keys, dtype=torch.float32) if upcast else keys
        v_out = torch.empty_like(values, dtype=torch.float32) if upcast else values
        cols = FP8_COPY_COLS
        grid = (batch, triton.cdiv(longest, COPY_ROWS), triton.cdiv(row_elems, cols))
        _gather_kv_fp8_kernel[grid](
            k_cache, v_cache, block_tables, seq_lens, cu_seqlens, k_scale, v_scale, k_out, v_out,
            row_elems, block_tables.stride(0), block_size, head_dim, _scale_stride(k_scale),
            ROWS=COPY_ROWS, COLS=cols, num_warps=COPY_NUM_WARPS,
        )
        if upcast:
            keys.copy_(k_out)
            values.copy_(v_out)
        return keys, values, cu_seqlens
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
    configs.append(AotConfig(
        "copy_blocks[i8,mapping=i64]", _copy_blocks_kernel,
        {"k_cache_ptr": "*i8", "v_cache_ptr": "*i8", "mapping_ptr": "*i64", "block_elems": "i32",
         "CHUNK": "constexpr"},
        {"CHUNK": BLOCK_COPY_CHUNK}, BLOCK_COPY_NUM_WARPS, divisible=("block_elems",),
    ))
    configs += _fp8_aot_configs()
    return configs


def _fp8_aot_configs() -> list[AotConfig]:
    """fp8 scatter (quantize) and gather (dequantize): format x key/output dtype x index dtype,
    for the archs that build the format (Fp8Format.min_arch)."""
    configs = []
    for fmt in FP8_FORMATS.values():
        fp8 = fmt.triton_name
        fmt_archs = tuple(a for a in (80, 90) if a >= fmt.min_arch)
        consts = {"ROWS": COPY_ROWS, "COLS": FP8_COPY_COLS, "MAX": fmt.max_finite, "MANT": fmt.mantissa_bits,
                  "EMIN": fmt.min_normal_exp}
        for src in ("fp16", "bf16", "fp32"):
            for index in ("i32", "i64"):
                configs.append(AotConfig(
                    f"scatter_kv[{fp8},key={src},slot={index}]", _scatter_kv_fp8_kernel,
                    {"key_ptr": f"*{src}", "value_ptr": f"*{src}", "k_cache_ptr": f"*{fp8}",
                     "v_cache_ptr": f"*{fp8}", "slot_ptr": f"*{index}", "k_scale_ptr": "*fp32",
                     "v_scale_ptr": "*fp32", "num_tokens": "i32", "row_elems": "i32", "head_dim": "i32",
                     "scale_stride": "i32", "ROWS": "constexpr", "COLS": "constexpr", "MAX": "constexpr",
                     "MANT": "constexpr", "EMIN": "constexpr"},
                    consts, COPY_NUM_WARPS, divisible=("row_elems", "head_dim"), archs=fmt_archs,
                ))
                configs.append(AotConfig(
                    f"gather_kv[{fp8},out={src},seq_lens={index}]", _gather_kv_fp8_kernel,
                    {"k_cache_ptr": f"*{fp8}", "v_cache_ptr": f"*{fp8}", "block_tables_ptr": "*i32",
                     "seq_lens_ptr": f"*{index}", "cu_seqlens_ptr": "*i32", "k_scale_ptr": "*fp32",
                     "v_scale_ptr": "*fp32", "keys_ptr": f"*{src}", "values_ptr": f"*{src}", "row_elems": "i32",
                     "block_table_stride": "i32", "block_size": "i32", "head_dim": "i32", "scale_stride": "i32",
                     "ROWS": "constexpr", "COLS": "constexpr"},
                    {"ROWS": COPY_ROWS, "COLS": FP8_COPY_COLS}, COPY_NUM_WARPS,
                    divisible=("row_elems", "block_size", "head_dim"), archs=fmt_archs,
                ))
    return configs

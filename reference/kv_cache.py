"""Reference KV-cache scatter / gather / block copy, written for clarity."""
from __future__ import annotations

import torch

# Largest finite value of each fp8 cache format (writes saturate to it).
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [..., Hkv, D]`` -> fp8 ``dtype``: the fp32 quotient ``x / scale`` (scale ``[]`` or
    ``[Hkv]``), saturated to the finite range, rounded to nearest even."""
    limit = FP8_MAX[dtype]
    q = x.float() / scale.float().reshape(*scale.shape, 1) if scale.dim() else x.float() / scale.float()
    return q.clamp(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp8 ``stored [..., Hkv, D]`` -> float64 ``stored * scale``; other dtypes: float64 as stored."""
    if scale is None:
        return stored.double()
    s = scale.double().reshape(*scale.shape, 1) if scale.dim() else scale.double()
    return stored.double() * s


def scatter_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int; slot = block * block_size + offset, < 0 skips the row
    *,
    k_scale: torch.Tensor | None = None,  # fp8 caches: [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write row t of key/value into cache slot ``slot_mapping[t]``; negative slots are skipped.
    An fp8 cache stores ``quantize(row, scale)``."""
    block_size = k_cache.shape[1]
    if k_cache.dtype in FP8_MAX:
        key, value = quantize(key, k_scale, k_cache.dtype), quantize(value, v_scale, v_cache.dtype)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(int(slot), block_size)
        k_cache[block, offset] = key[t]
        v_cache[block, offset] = value[t]


def gather_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int
    *,
    k_scale: torch.Tensor | None = None,  # fp8 caches: [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,  # fp8 caches: output dtype (None: float32)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each sequence's KV history out of the paged cache, packed in sequence order.

    Returns ``keys, values [sum(seq_lens), Hkv, D]`` and ``cu_seqlens_k [B + 1] int32``. An fp8
    cache comes out dequantized, ``stored * scale`` rounded once to ``dtype``.
    """
    if k_cache.dtype in FP8_MAX:
        out = dtype or torch.float32
        k_cache = dequantize(k_cache, k_scale).to(out)
        v_cache = dequantize(v_cache, v_scale).to(out)
    block_size = k_cache.shape[1]
    keys, values = [], []
    for b, length in enumerate(seq_lens.tolist()):
        for pos in range(int(length)):
            block = int(block_tables[b, pos // block_size])
            keys.append(k_cache[block, pos % block_size])
            values.append(v_cache[block, pos % block_size])
    hkv, dim = k_cache.shape[2], k_cache.shape[3]
    if keys:
        keys_t, values_t = torch.stack(keys), torch.stack(values)
    else:
        keys_t = k_cache.new_empty((0, hkv, dim))
        values_t = v_cache.new_empty((0, hkv, dim))
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=k_cache.device)
    cu[1:] = torch.cumsum(seq_lens.to(torch.int64), 0).to(torch.int32)
    return keys_t, values_t, cu


def copy_blocks(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_mapping: torch.Tensor,  # [N, 2] int; rows of (src, dst)
) -> None:
    """Copy whole physical blocks ``src -> dst`` (copy-on-write of shared prefix blocks)."""
    for src, dst in block_mapping.tolist():
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]

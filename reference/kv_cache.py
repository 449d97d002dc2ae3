"""Reference KV-cache scatter / gather / block copy, written for clarity."""
from __future__ import annotations

import torch


def scatter_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int; slot = block * block_size + offset, < 0 skips the row
) -> None:
    """Write row t of key/value into cache slot ``slot_mapping[t]``; negative slots are skipped."""
    block_size = k_cache.shape[1]
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each sequence's KV history out of the paged cache, packed in sequence order.

    Returns ``keys, values [sum(seq_lens), Hkv, D]`` and ``cu_seqlens_k [B + 1] int32``.
    """
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

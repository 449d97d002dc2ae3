"""Fast vectorised PyTorch implementations, used on CPU when Triton is not interpreting.

Inputs are already validated. These serve the engine on machines without a GPU, so they
favour few large torch calls over the clarity of ``cbkernels.reference``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window) -> torch.Tensor:
    """The attention mask rule, the one place the PyTorch side writes it: key position
    ``k_pos`` is visible to query position ``q_pos`` when ``k_pos <= q_pos`` (causal, with the
    query rows of a chunk aligned to the end of its keys) and, with a window ``W``, when
    ``k_pos > q_pos - W`` (the last W positions, the query's own included). Broadcasts."""
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    return mask


def slots_for(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Physical slot of every (sequence, position) pair, packed in sequence order: [sum(seq_lens)]."""
    lens = seq_lens.to(torch.int64)
    seq_ids = torch.repeat_interleave(torch.arange(lens.shape[0], device=lens.device), lens)
    starts = torch.cumsum(lens, 0) - lens
    positions = torch.arange(seq_ids.shape[0], device=lens.device) - starts[seq_ids]
    blocks = block_tables[seq_ids, positions // block_size].to(torch.int64)
    return blocks * block_size + positions % block_size


FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def gather_dtype(cache_dtype: torch.dtype, dtype) -> torch.dtype:
    """Output dtype of gather_kv: fp8 caches dequantize to ``dtype`` (float32 by default)."""
    return (dtype or torch.float32) if cache_dtype in FP8_MAX else cache_dtype


def _per_head(scale: torch.Tensor) -> torch.Tensor:
    """[] or [Hkv] -> broadcastable over [..., Hkv, D]."""
    return scale.unsqueeze(-1) if scale.dim() else scale


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x / scale`` saturated to the fp8 format's finite range, rounded to nearest even."""
    limit = FP8_MAX[dtype]
    return (x.float() / _per_head(scale)).clamp_(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """``stored * scale`` in fp32, rounded once to ``dtype`` (no-op for non-fp8 tensors)."""
    if stored.dtype not in FP8_MAX:
        return stored
    return (stored.float() * _per_head(scale)).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 (CPU index_copy_ has no fp8 kernel; a copy moves bits anyway)."""
    return t.view(torch.uint8) if t.dtype in FP8_MAX else t


def scatter_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    row_shape = k_cache.shape[2:]
    if k_cache.dtype in FP8_MAX:
        key, value = quantize(key, k_scale, k_cache.dtype), quantize(value, v_scale, v_cache.dtype)
    keep = slot_mapping >= 0
    slots = slot_mapping.to(torch.int64)
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    bits(k_cache).view(-1, *row_shape).index_copy_(0, slots, bits(key))
    bits(v_cache).view(-1, *row_shape).index_copy_(0, slots, bits(value))


def gather_kv(k_cache, v_cache, block_tables, seq_lens, k_scale=None, v_scale=None, dtype=None):
    row_shape = k_cache.shape[2:]
    slots = slots_for(block_tables, seq_lens, k_cache.shape[1])
    out = gather_dtype(k_cache.dtype, dtype)
    keys = dequantize(k_cache.view(-1, *row_shape).index_select(0, slots), k_scale, out)
    values = dequantize(v_cache.view(-1, *row_shape).index_select(0, slots), v_scale, out)
    cu = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=k_cache.device)
    cu[1:] = torch.cumsum(seq_lens, 0)
    return keys, values, cu


def copy_blocks(k_cache, v_cache, block_mapping) -> None:
    src, dst = block_mapping[:, 0].to(torch.int64), block_mapping[:, 1].to(torch.int64)
    k_bits, v_bits = bits(k_cache), bits(v_cache)
    k_bits.index_copy_(0, dst, k_bits.index_select(0, src))
    v_bits.index_copy_(0, dst, v_bits.index_select(0, src))


def _history(cache: torch.Tensor, table_row: torch.Tensor, kv_len: int, scale=None, dtype=None) -> torch.Tensor:
    """[Hkv, L, D] view-gather of one sequence's keys or values (fp8: dequantized to ``dtype``)."""
    block_size = cache.shape[1]
    n_blocks = -(-kv_len // block_size)
    rows = cache.index_select(0, table_row[:n_blocks].to(torch.int64))
    return dequantize(rows.flatten(0, 1)[:kv_len], scale, dtype).transpose(0, 1)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, lse, *,
                    scale, sliding_window, softcap, sinks, k_scale=None, v_scale=None) -> None:
    """Per-sequence attention into ``out`` [T, Hq, D] (and ``lse`` [T, Hq] when given).

    Plain causal attention goes through SDPA; softcap, sinks or lse use explicit fp32 math.
    """
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    explicit = softcap is not None or sinks is not None or lse is not None
    cu = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(seq_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        n_rows = end - start
        if n_rows == 0:
            continue
        keys = _history(k_cache, block_tables[b], kv_len, k_scale, q.dtype)  # [Hkv, L, D]
        values = _history(v_cache, block_tables[b], kv_len, v_scale, q.dtype)
        queries = q[start:end].transpose(0, 1)  # [Hq, Lq, D]
        mask = None
        if n_rows > 1 or sliding_window is not None:
            mask = chunk_mask(n_rows, kv_len, sliding_window, q.device)
        if not explicit:
            res = F.scaled_dot_product_attention(
                queries.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                attn_mask=mask, scale=scale, enable_gqa=group > 1,
            )[0]
            out[start:end] = res.transpose(0, 1)
            continue
        keys_f = keys.float().repeat_interleave(group, 0)
        values_f = values.float().repeat_interleave(group, 0)
        logits = torch.matmul(queries.float(), keys_f.transpose(1, 2)) * scale  # [Hq, Lq, L]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        denom = logits
        if sinks is not None:
            sink = sinks.float().view(-1, 1, 1).expand(-1, n_rows, 1)
            denom = torch.cat([logits, sink], dim=-1)
        row_lse = torch.logsumexp(denom, dim=-1)  # [Hq, Lq]
        probs = torch.exp(logits - row_lse[..., None])
        out[start:end] = torch.matmul(probs, values_f).transpose(0, 1).to(out.dtype)
        if lse is not None:
            lse[start:end] = row_lse.transpose(0, 1)


def chunk_mask(n_rows: int, kv_len: int, sliding_window, device) -> torch.Tensor:
    """[Lq, L] bool, True = attend; the query rows are the last n_rows of kv_len positions."""
    q_pos = torch.arange(kv_len - n_rows, kv_len, device=device)[:, None]
    return visible(q_pos, torch.arange(kv_len, device=device)[None, :], sliding_window)

"""Reference paged attention: one sequence at a time, in float64, straight from the definition."""
from __future__ import annotations

import math

import torch

from .kv_cache import FP8_MAX, dequantize


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int; total KV length of each sequence, new tokens included
    cu_seqlens_q: torch.Tensor,  # [B + 1] int; sequence b owns q rows cu[b]:cu[b+1]
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [Hq]
    out: torch.Tensor | None = None,  # [T, Hq, D]
    return_lse: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    k_scale: torch.Tensor | None = None,  # fp8 caches: [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
):
    """Causal (bottom-right aligned) attention of packed query rows over a paged KV cache.

    Query row r of a sequence with ``Lq`` new rows and ``L = seq_lens[b]`` keys sits at
    position ``L - Lq + r`` and sees key positions ``p <= pos`` (and ``p > pos - sliding_window``
    when a window is given). ``lse`` is the natural log of the softmax denominator, sinks
    included. ``max_seqlen_*`` are accepted for signature parity and ignored. An fp8 cache is
    read as ``stored * scale`` (per tensor or per KV head), in float64.
    """
    if k_cache.dtype in FP8_MAX:
        k_cache, v_cache = dequantize(k_cache, k_scale), dequantize(v_cache, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    result = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.zeros(num_tokens, num_q_heads, dtype=torch.float64, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(seq_lens.tolist()):
        start, end = int(cu[b]), int(cu[b + 1])
        n_rows, kv_len = end - start, int(kv_len)
        if n_rows == 0:
            continue
        n_blocks = math.ceil(kv_len / block_size)
        blocks = block_tables[b, :n_blocks].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].double()
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].double()
        keys = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = values.repeat_interleave(group, dim=1)
        queries = q[start:end].double()  # [Lq, Hq, D]
        logits = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        q_pos = torch.arange(kv_len - n_rows, kv_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        logits = logits.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.double().view(num_q_heads, 1, 1).expand(num_q_heads, n_rows, 1)
            denom_logits = torch.cat([logits, sink], dim=-1)
        else:
            denom_logits = logits
        row_lse = torch.logsumexp(denom_logits, dim=-1)  # [Hq, Lq]
        probs = torch.exp(logits - row_lse[..., None])
        result[start:end] = torch.einsum("hqk,khd->qhd", probs, values)
        lse[start:end] = row_lse.transpose(0, 1)
    result = result.to(q.dtype)
    if out is not None:
        out.copy_(result)
        result = out
    if return_lse:
        return result, lse.float()
    return result

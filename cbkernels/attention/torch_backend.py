"""The PyTorch backend: the engine's path on a CPU without the Triton interpreter.

Few large torch calls per layer: all decode rows attend in one SDPA call over a history
gathered block by block and masked, ``[Bd, Hkv, Lpad, D]``; each prefill chunk runs one SDPA, straight on its
new rows when it has no cached prefix. The gather indices and masks are built once per step
(``build``) and shared by every layer. Softcap and sinks take the explicit fp32 path of
``cbkernels.ops.torch_path.paged_attention``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import torch_path
from .backend import AttentionBackend
from .metadata import GroupMetadata, StepMetadata, StepPlan


@dataclass(slots=True)
class TorchGroupMetadata(GroupMetadata):
    decode_blocks: Optional[torch.Tensor] = None  # [Bd, nb] int32 blocks of each decode row's history
    decode_mask: Optional[torch.Tensor] = None  # [Bd, 1, 1, nb * block_size] bool, True = attend; None: all
    prefix_slots: list = field(default_factory=list)  # per prefill chunk: [L] int64 slots, None: no prefix


def _positions_to_slots(table_rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """slots[b, i] of positions[i] through block table row b."""
    blocks = table_rows.to(torch.int64)[:, positions // block_size]
    return blocks * block_size + positions % block_size


class TorchBackend(AttentionBackend):
    name = "torch"
    _arange: Optional[torch.Tensor] = None

    def _positions(self, n: int) -> torch.Tensor:
        """0 .. n-1 on the device (a view of one cached arange, grown when too short)."""
        if self._arange is None or self._arange.numel() < n:
            self._arange = torch.arange(max(n, 1024), device=self.device)
        return self._arange[:n]

    def build_group(self, plan: StepPlan, step, block_tables: torch.Tensor, slots: torch.Tensor,
                    window: Optional[int]) -> GroupMetadata:
        dev, bs, nd = self.device, plan.block_size, plan.num_decodes
        meta = TorchGroupMetadata(slots, block_tables, window)
        if nd:
            lens = plan.seq_lens if nd == len(plan.seq_lens) else plan.seq_lens[:nd]
            longest = plan.max_seqlen_k if plan.padded else max(lens)
            nb = -(-longest // bs)
            rows = block_tables if nd == len(plan.seq_lens) else block_tables.narrow(0, 0, nd)
            meta.decode_blocks = rows.narrow(1, 0, nb)  # whole blocks: nb indices a row, not nb * bs
            # Decided on host ints (no device read): a mask is needed unless every decode row
            # sees every gathered position. Static buffers (CUDA-graph buckets) always carry one.
            if plan.padded or min(lens) != nb * bs or (window is not None and window < nb * bs):
                # [Bd, 1, 1, 1] each decode row's own position against [nb * bs] gathered ones
                last = (step.positions if nd == len(step.positions) else step.positions.narrow(0, 0, nd))
                seen = torch_path.visible(last.view(nd, 1, 1, 1), self._positions(nb * bs), window)
                meta.decode_mask = seen  # [Bd, 1, 1, nb * bs]
        for b in range(nd, len(plan.seq_lens)):
            if plan.seq_lens[b] == plan.query_lens[b]:
                meta.prefix_slots.append(None)  # whole prompt in this step: keys are the new rows
            else:
                pos = torch.arange(plan.seq_lens[b], device=dev)
                meta.prefix_slots.append(_positions_to_slots(block_tables[b:b + 1], pos, bs)[0])
        return meta

    def run_layer(self, query, key, value, new_k, new_v, k_cache, v_cache, meta, group, *,
                  scale, softcap, sinks, window, k_scale=None, v_scale=None):
        fp8 = k_scale is not None
        if fp8:  # quantize once; a prefill without a prefix then attends to what the cache holds
            new_k = torch_path.quantize(new_k, k_scale, k_cache.dtype)
            new_v = torch_path.quantize(new_v, v_scale, v_cache.dtype)
        if meta.padded:  # padding rows of a decode bucket hold slot -1: skipped
            torch_path.scatter_kv(new_k, new_v, torch_path.bits(k_cache), torch_path.bits(v_cache),
                                  group.slot_mapping)
        else:
            row_shape = k_cache.shape[2:]
            torch_path.bits(k_cache).view(-1, *row_shape).index_copy_(0, group.slot_mapping, torch_path.bits(new_k))
            torch_path.bits(v_cache).view(-1, *row_shape).index_copy_(0, group.slot_mapping, torch_path.bits(new_v))
        if softcap is None and sinks is None:
            if fp8:
                dt = query.dtype
                key = torch_path.dequantize(new_k, k_scale, dt).transpose(0, 1).unsqueeze(0)
                value = torch_path.dequantize(new_v, v_scale, dt).transpose(0, 1).unsqueeze(0)
            return _packed_attention(query, key, value, k_cache, v_cache, meta, group, scale, window,
                                     k_scale, v_scale)
        q = query[0].transpose(0, 1)
        out = torch.empty_like(q)
        torch_path.paged_attention(q, k_cache, v_cache, group.block_tables, meta.seq_lens, meta.cu_seqlens_q,
                                   out, None, scale=scale, sliding_window=window, softcap=softcap, sinks=sinks,
                                   k_scale=k_scale, v_scale=v_scale)
        return out.unsqueeze(0)


def _packed_attention(query, key, value, k_cache, v_cache, meta: StepMetadata, group: TorchGroupMetadata,
                      scale: float, window: Optional[int], k_scale=None, v_scale=None) -> torch.Tensor:
    """query [1, Hq, T, D], key / value [1, Hkv, T, D], new K/V already in the cache -> [1, T, Hq, D].
    An fp8 cache's history is dequantized to the query dtype after the gather."""
    num_q_heads, num_tokens = query.shape[1], query.shape[2]
    gqa = num_q_heads != key.shape[1]
    out = query.new_empty(1, num_tokens, num_q_heads, query.shape[3])
    row_shape = k_cache.shape[2:]
    k_flat, v_flat = k_cache.view(-1, *row_shape), v_cache.view(-1, *row_shape)
    nd = meta.num_decodes
    if nd:
        blocks = group.decode_blocks.to(torch.int64)
        keys = torch_path.dequantize(k_cache[blocks].flatten(1, 2), k_scale, query.dtype).transpose(1, 2)
        values = torch_path.dequantize(v_cache[blocks].flatten(1, 2), v_scale, query.dtype).transpose(1, 2)
        # keys / values: [Bd, Hkv, nb * block_size, D]
        q = query[0, :, :nd].transpose(0, 1).unsqueeze(2)  # [Bd, Hq, 1, D]
        res = F.scaled_dot_product_attention(q, keys, values, attn_mask=group.decode_mask, scale=scale,
                                             enable_gqa=gqa)
        out[0, :nd] = res[:, :, 0]
    for (start, end, kv_len), slots in zip(meta.prefill_spans, group.prefix_slots):
        n_rows = end - start
        q = query[:, :, start:end]
        if slots is None:
            keys, values = key[:, :, start:end], value[:, :, start:end]
        else:
            keys = torch_path.dequantize(k_flat[slots], k_scale, query.dtype).transpose(0, 1).unsqueeze(0)
            values = torch_path.dequantize(v_flat[slots], v_scale, query.dtype).transpose(0, 1).unsqueeze(0)
            # [1, Hkv, L, D]
        if slots is None and window is None:
            res = F.scaled_dot_product_attention(q, keys, values, is_causal=n_rows > 1, scale=scale, enable_gqa=gqa)
        else:
            mask = torch_path.chunk_mask(n_rows, kv_len, window, query.device)
            res = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[0, start:end] = res[0].transpose(0, 1)
    return out

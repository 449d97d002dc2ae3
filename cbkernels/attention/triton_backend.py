"""The Triton backend: the engine's path on CUDA (and under the interpreter in tests).

It calls the unchecked custom ops: the engine built this metadata (and its tests check
it), and per-layer value checks would cost device-to-host syncs on CUDA. The split-KV
workspace is owned here, sized once per step from the kernel's launch plan, and every
buffer handed out stays alive for as long as the backend, because a captured CUDA graph
keeps pointing at the one it saw.
"""
from __future__ import annotations

import torch

from ..ops import _paged_attention_op, _scatter_kv_op
from .backend import AttentionBackend
from .metadata import StepMetadata, StepPlan


class SplitWorkspace:
    """A growing fp32 buffer for split-KV partials; old buffers are kept, never freed early."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = []

    def get(self, numel: int) -> torch.Tensor:
        if not self.buffers or self.buffers[-1].numel() < numel:
            self.buffers.append(torch.empty(max(numel, 1), dtype=torch.float32, device=self.device))
        return self.buffers[-1][:numel]

    @property
    def numel(self) -> int:
        return self.buffers[-1].numel() if self.buffers else 0


class TritonMetadata(StepMetadata):
    __slots__ = ("workspace",)


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, cache, num_q_heads: int):
        super().__init__(cache, num_q_heads)
        self.workspace = SplitWorkspace(self.device)

    def metadata_class(self) -> type:
        return TritonMetadata

    def build(self, plan: StepPlan) -> StepMetadata:
        from cbkernels.kernels.paged_attention_tiles import plan_launch

        meta = super().build(plan)
        kv = self.cache.kv  # [layers, 2, blocks, block_size, Hkv, D]
        num_tokens = len(plan.input_ids)
        # The launch (tiles, splits) follows the compute dtype: the model's, also for fp8 caches.
        dtype = kv.dtype if self.kv_scales is None else getattr(self.cache, "compute_dtype", torch.float32)
        launch = plan_launch(self.device, dtype, num_tokens, len(plan.seq_lens), self.num_q_heads,
                             kv.shape[4], kv.shape[5], meta.max_seqlen_q, meta.max_seqlen_k)
        numel = launch.workspace_numel(num_tokens, self.num_q_heads)
        meta.workspace = self.workspace.get(numel) if numel else None
        return meta

    def run_layer(self, query, key, value, new_k, new_v, k_cache, v_cache, meta, group, *,
                  scale, softcap, sinks, window, k_scale=None, v_scale=None):
        _scatter_kv_op(new_k.contiguous(), new_v.contiguous(), k_cache, v_cache, group.slot_mapping, k_scale, v_scale)
        q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
        out = torch.empty_like(q)
        _paged_attention_op(q, k_cache, v_cache, group.block_tables, meta.seq_lens, meta.cu_seqlens_q, out, None,
                            scale, window, None if softcap is None else float(softcap), sinks,
                            meta.max_seqlen_q, meta.max_seqlen_k, None, meta.workspace, k_scale, v_scale)
        return out.unsqueeze(0)

"""The interface every attention backend implements: two verbs, ``build`` and ``attend``.

A backend belongs to one engine and holds that engine's paged cache. ``build`` turns a
step's host plan into the metadata its kernels need; ``attend`` runs one layer's attention
of that step (write the new K/V into the cache, attend over the paged history). Adding a
backend means one module with a subclass, plus its name in ``cbkernels.attention.BACKENDS``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from .integration import BACKEND_KWARG, METADATA_KWARG
from .metadata import GroupMetadata, StepMetadata, StepPlan, StepTensors, slot_mapping


class AttentionBackend(ABC):
    name: str = ""

    def __init__(self, cache, num_q_heads: int):
        """``cache``: the engine's ``PagedAttentionCache`` (``layer_cache(layer)``,
        ``group_of_layer``, ``kv``, ``device_tables``); ``num_q_heads``: the model's query heads."""
        self.cache = cache
        self.num_q_heads = num_q_heads
        self.device = cache.kv.device
        self.layer_calls = 0  # attention calls since the runner last reset it (one per layer per forward)

    # ------------------------------------------------------------------ verb 1
    def build(self, plan: StepPlan) -> StepMetadata:
        """Device metadata of one step: one host-to-device copy of the plan's integers, the
        block-table updates applied, then everything else computed on the device."""
        step = StepTensors(plan, self.device)
        tables = self.cache.device_tables
        tables.apply(step.table_updates)
        groups = []
        for g, window in enumerate(plan.windows):
            block_tables = tables.table(g).index_select(0, step.rows)
            if plan.table_width is not None:
                block_tables = block_tables[:, :plan.table_width]
            slots = slot_mapping(tables.table(g), step, plan.block_size, plan.num_padding)
            groups.append(self.build_group(plan, step, block_tables, slots, window))
        t = len(plan.input_ids)
        return self.metadata_class()(
            step.input_ids.view(1, t), step.positions.view(1, t), groups, step.seq_lens, step.cu_seqlens_q,
            max(plan.query_lens), plan.max_seqlen_k, plan.num_decodes, plan.prefill_spans(), plan.padded)

    def build_group(self, plan: StepPlan, step: StepTensors, block_tables: torch.Tensor, slots: torch.Tensor,
                    window: Optional[int]) -> GroupMetadata:
        """One layer group's metadata from its device tables [B, W] and slots [T]."""
        return GroupMetadata(slots, block_tables, window)

    def metadata_class(self) -> type:
        return StepMetadata

    # ------------------------------------------------------------------ verb 2
    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               meta: StepMetadata, *, scaling: Optional[float], softcap: Optional[float],
               sliding_window: Optional[int]) -> torch.Tensor:
        """One layer of a step. query [1, Hq, T, D], key / value [1, Hkv, T, D] in the
        model's layout; returns [1, T, Hq, D]."""
        self.layer_calls += 1
        layer = module.layer_idx
        group = meta.groups[self.cache.group_of_layer[layer]]
        k_cache, v_cache = self.cache.layer_cache(layer)
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        window = group.sliding_window if group.sliding_window is not None else sliding_window
        sinks = getattr(module, "sinks", None)
        new_k, new_v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, D]
        return self.run_layer(query, key, value, new_k, new_v, k_cache, v_cache, meta, group,
                              scale=scale, softcap=softcap, sinks=sinks, window=window)

    @abstractmethod
    def run_layer(self, query, key, value, new_k, new_v, k_cache, v_cache, meta: StepMetadata,
                  group: GroupMetadata, *, scale: float, softcap, sinks, window) -> torch.Tensor:
        """Scatter ``new_k`` / ``new_v`` [T, Hkv, D] into the layer's cache, then attend."""

    def forward_kwargs(self, meta: StepMetadata) -> dict:
        """The kwargs that carry a step to every attention layer of a forward."""
        return {METADATA_KWARG: meta, BACKEND_KWARG: self}

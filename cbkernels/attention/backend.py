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


# Computed fp8 scales leave this factor of headroom over the first prefill's amax, so later
# tokens up to twice as large still fit the format's range (larger ones saturate).
FP8_SCALE_MARGIN = 2.0
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


class KVScales:
    """The fp8 scales of an engine's cache, one ``[Hkv]`` fp32 pair per layer, fixed for the
    engine's lifetime (a captured CUDA graph keeps pointing at them).

    A layer takes its scales from the checkpoint when its attention module carries
    ``k_scale`` / ``v_scale`` (as fp8-quantised checkpoints for vLLM do: a number, or one per
    KV head; dequantized = stored * scale). Otherwise they are computed from the first K/V the
    layer writes (the engine's first prefill): ``amax`` per KV head x FP8_SCALE_MARGIN / the
    format's largest finite value, on the device, without a host sync.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, dtype: torch.dtype, device):
        self.limit = _FP8_MAX[dtype]
        self.k = torch.ones(num_layers, num_kv_heads, dtype=torch.float32, device=device)
        self.v = torch.ones(num_layers, num_kv_heads, dtype=torch.float32, device=device)
        self.source: list[Optional[str]] = [None] * num_layers  # "checkpoint" or "computed" once set

    def _from_checkpoint(self, module, name: str, num_kv_heads: int) -> Optional[torch.Tensor]:
        value = getattr(module, name, None)
        if value is None:
            return None
        t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float32)
        t = t.reshape(-1).to(self.k.device)
        if t.numel() == 1:
            t = t.expand(num_kv_heads)
        if t.numel() != num_kv_heads:
            raise ValueError(f"{name} of layer {module.layer_idx} must be one number or one per KV head "
                             f"({num_kv_heads}), got {t.numel()} values")
        return t

    def for_layer(self, module, layer: int, new_k: torch.Tensor, new_v: torch.Tensor):
        """(k_scale, v_scale) [Hkv] of ``layer``, set on its first call."""
        if self.source[layer] is None:
            hkv = self.k.shape[1]
            k_ck = self._from_checkpoint(module, "k_scale", hkv)
            v_ck = self._from_checkpoint(module, "v_scale", hkv)
            if k_ck is not None and v_ck is not None:
                self.k[layer].copy_(k_ck)
                self.v[layer].copy_(v_ck)
                self.source[layer] = "checkpoint"
            else:
                for target, rows in ((self.k[layer], new_k), (self.v[layer], new_v)):
                    amax = rows.detach().float().abs().amax(dim=(0, 2))  # [Hkv]
                    target.copy_(torch.where(amax > 0, amax * FP8_SCALE_MARGIN / self.limit, 1.0))
                self.source[layer] = "computed"
        return self.k[layer], self.v[layer]


class AttentionBackend(ABC):
    name: str = ""

    def __init__(self, cache, num_q_heads: int):
        """``cache``: the engine's ``PagedAttentionCache`` (``layer_cache(layer)``,
        ``group_of_layer``, ``kv``, ``device_tables``); ``num_q_heads``: the model's query heads."""
        self.cache = cache
        self.num_q_heads = num_q_heads
        self.device = cache.kv.device
        self.layer_calls = 0  # attention calls since the runner last reset it (one per layer per forward)
        kv = cache.kv
        # fp8 caches: per-layer scales, engine-lifetime state of this backend (None otherwise).
        self.kv_scales = (KVScales(kv.shape[0], kv.shape[4], kv.dtype, kv.device)
                          if kv is not None and kv.dtype in _FP8_MAX else None)

    # ------------------------------------------------------------------ verb 1
    def build(self, plan: StepPlan) -> StepMetadata:
        """Device metadata of one step: one host-to-device copy of the plan's integers, the
        block-table updates applied, then everything else computed on the device."""
        tables = self.cache.device_tables
        step = StepTensors(plan, self.device, tables.flat_updates(plan.table_updates))
        tables.apply(step.table_updates)
        groups = []
        for g, window in enumerate(plan.windows):
            table = tables.table(g)
            block_tables = table.index_select(0, step.rows)
            if plan.table_width is not None:
                block_tables = block_tables.narrow(1, 0, plan.table_width)
            slots = slot_mapping(table, step, plan.block_size, plan.num_padding)
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
        k_scale = v_scale = None
        if self.kv_scales is not None:
            k_scale, v_scale = self.kv_scales.for_layer(module, layer, new_k, new_v)
        return self.run_layer(query, key, value, new_k, new_v, k_cache, v_cache, meta, group,
                              scale=scale, softcap=softcap, sinks=sinks, window=window,
                              k_scale=k_scale, v_scale=v_scale)

    @abstractmethod
    def run_layer(self, query, key, value, new_k, new_v, k_cache, v_cache, meta: StepMetadata,
                  group: GroupMetadata, *, scale: float, softcap, sinks, window,
                  k_scale=None, v_scale=None) -> torch.Tensor:
        """Scatter ``new_k`` / ``new_v`` [T, Hkv, D] into the layer's cache, then attend. An fp8
        cache comes with its layer's ``k_scale`` / ``v_scale`` [Hkv] fp32."""

    def forward_kwargs(self, meta: StepMetadata) -> dict:
        """The kwargs that carry a step to every attention layer of a forward."""
        return {METADATA_KWARG: meta, BACKEND_KWARG: self}

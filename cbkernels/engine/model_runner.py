"""Build one packed batch per step, run the model forward once, sample.

The batch is a single row ``[1, T]`` of every scheduled request's new tokens back to back
(decodes first, then prefill chunks): no padding. The paged metadata of the step is built
once here and reaches every attention layer through the model's forward kwargs
(``cbkernels_metadata=``), never through module state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .cache import PagedAttentionCache
from .cuda_graphs import DecodeGraphs, resolve_use_cuda_graph
from .requests import Request
from .sampling import sample

METADATA_KWARG = "cbkernels_metadata"
# A 4-D mask makes transformers' mask builders return it untouched (they treat 4-D masks as
# already prepared), so a paged step builds no [T, T] mask; the attention function ignores it.
_NO_MASK_SHAPE = (1, 1, 1, 1)


@dataclass(slots=True)
class GroupMetadata:
    """Kernel arguments of one layer group (full attention, or one sliding window)."""

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    sliding_window: Optional[int]
    # Fast PyTorch path only: decode rows read their history with one gather.
    decode_slots: Optional[torch.Tensor] = None  # [Bd, Lmax] int64
    decode_mask: Optional[torch.Tensor] = None  # [Bd, 1, 1, Lmax] bool, True = attend
    prefix_slots: Optional[list] = None  # per prefill chunk: [L] int64 slots, None if no prefix


@dataclass(slots=True)
class PagedMetadata:
    cache: PagedAttentionCache
    groups: list[GroupMetadata]
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    num_decodes: int  # the first num_decodes sequences have exactly one query row
    prefill_spans: list  # (start, end, kv_len) of every other sequence
    backend: str  # "torch" or "triton"
    padded: bool = False  # slot_mapping may hold -1: padding rows of a CUDA-graph bucket, never written
    layers_seen: int = 0  # attention calls that used this metadata (checked after the forward)


def _positions_to_slots(table_rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """slots[b, i] of positions[i] through block table row b."""
    blocks = table_rows.to(torch.int64)[:, positions // block_size]
    return blocks * block_size + positions % block_size


class ModelRunner:
    """``use_cuda_graph`` follows ``BatchConfig.use_cuda_graph`` (None: on for CUDA with the
    Triton backend); ``max_num_seqs`` bounds the largest decode graph. Decode-only steps then
    run through ``self.graphs`` (``cbkernels.cuda_graphs``), every other step eagerly."""

    def __init__(self, model, cache: PagedAttentionCache, backend: str, generator: Optional[torch.Generator],
                 *, use_cuda_graph: Optional[bool] = False, max_num_seqs: Optional[int] = None):
        self.model = model
        self.cache = cache
        self.backend = backend
        self.generator = generator
        self.device = cache.kv.device
        self._no_mask = torch.ones(_NO_MASK_SHAPE, dtype=torch.bool, device=self.device)
        self.graphs: Optional[DecodeGraphs] = None
        self.eager_steps = 0
        if resolve_use_cuda_graph(use_cuda_graph, self.device, backend):
            limit = cache.max_batch_tokens if max_num_seqs is None else min(max_num_seqs, cache.max_batch_tokens)
            self.graphs = DecodeGraphs(self, limit)

    def build(self, requests: list[Request], num_tokens: list[int]):
        """Packed inputs and metadata; ``requests`` must list one-row requests first."""
        bs, dev = self.cache.block_size, self.device
        ids, positions, seq_lens, cu = [], [], [], [0]
        for req, n in zip(requests, num_tokens):
            start = req.num_computed
            ids.extend(req.tokens[start:start + n])
            positions.extend(range(start, start + n))
            seq_lens.append(start + n)
            cu.append(cu[-1] + n)
        num_decodes = sum(1 for n in num_tokens if n == 1)
        groups = []
        for alloc in self.cache.allocators:
            tables = [alloc.block_table(r.request_id) for r in requests]
            width = max(len(t) for t in tables)
            rows = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
            slot_mapping = [t[p // bs] * bs + p % bs for t, r, n in zip(tables, requests, num_tokens)
                            for p in range(r.num_computed, r.num_computed + n)]
            meta = GroupMetadata(torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
                                 rows.to(dev), alloc.sliding_window)
            if self.backend == "torch":
                self._torch_extras(meta, rows, seq_lens, num_tokens, num_decodes)
            groups.append(meta)
        prefill_spans = [(cu[i], cu[i + 1], seq_lens[i]) for i in range(num_decodes, len(requests))]
        metadata = PagedMetadata(
            self.cache, groups, torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            torch.tensor(cu, dtype=torch.int32, device=dev), max(num_tokens), max(seq_lens),
            num_decodes, prefill_spans, self.backend,
        )
        input_ids = torch.tensor([ids], dtype=torch.int64, device=dev)
        position_ids = torch.tensor([positions], dtype=torch.int64, device=dev)
        return input_ids, position_ids, metadata

    def _torch_extras(self, meta: GroupMetadata, rows, seq_lens, num_tokens, num_decodes) -> None:
        bs, dev, window = self.cache.block_size, self.device, meta.sliding_window
        if num_decodes:
            lens = torch.tensor(seq_lens[:num_decodes], dtype=torch.int64)
            pos = torch.arange(int(lens.max()))
            meta.decode_slots = _positions_to_slots(rows[:num_decodes], pos, bs).to(dev)
            visible = pos[None, :] < lens[:, None]
            if window is not None:
                visible &= pos[None, :] > lens[:, None] - 1 - window
            meta.decode_mask = None if bool(visible.all()) else visible[:, None, None, :].to(dev)
        meta.prefix_slots = []
        for b in range(num_decodes, len(seq_lens)):
            if seq_lens[b] == num_tokens[b]:
                meta.prefix_slots.append(None)  # whole prompt in this step: keys are the new rows
            else:
                pos = torch.arange(seq_lens[b])
                meta.prefix_slots.append(_positions_to_slots(rows[b:b + 1], pos, bs)[0].to(dev))

    def forward(self, input_ids, position_ids, meta: PagedMetadata, logits_to_keep) -> torch.Tensor:
        """Model forward over one packed step: logits [1, S, V]."""
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=self._no_mask,
            use_cache=False, logits_to_keep=logits_to_keep, **{METADATA_KWARG: meta},
        )
        if meta.layers_seen != self.cache.num_layers:
            raise RuntimeError(
                f"{meta.layers_seen} of {self.cache.num_layers} attention layers ran the paged path: the model's "
                "attention modules do not dispatch through config._attn_implementation='cbkernels'")
        return out.logits

    def graph_stats(self) -> dict:
        """Steps that ran the padded decode path (graph replays) vs eagerly."""
        stats = {"eager_steps": self.eager_steps, "cuda_graph_steps": 0, "cuda_graphs_captured": 0}
        if self.graphs is not None:
            stats.update(self.graphs.stats())
        return stats

    @torch.inference_mode()
    def step(self, requests: list[Request], num_tokens: list[int]) -> dict[int, int]:
        """Run one forward; returns {index into requests: sampled token} for the requests
        whose chunk reaches the end of their known tokens."""
        sampling = [i for i, (r, n) in enumerate(zip(requests, num_tokens)) if r.num_computed + n == len(r.tokens)]
        bucket = self.graphs.bucket_for(requests, num_tokens) if self.graphs is not None else None
        logits = self.graphs.run(requests, bucket) if bucket is not None else None
        if logits is not None:  # one row per request
            logits = logits[sampling]
        else:
            self.eager_steps += 1
            logits = self._eager(requests, num_tokens, sampling)
        if not sampling:
            return {}
        tokens = sample(logits, [requests[i].params for i in sampling], self.generator)
        return dict(zip(sampling, tokens))

    def _eager(self, requests: list[Request], num_tokens: list[int], sampling: list[int]) -> torch.Tensor:
        input_ids, position_ids, meta = self.build(requests, num_tokens)
        if not sampling:
            rows = torch.tensor([0], dtype=torch.int64, device=self.device)  # logits unused
        else:
            cu = meta.cu_seqlens_q.tolist()
            rows = torch.tensor([cu[i + 1] - 1 for i in sampling], dtype=torch.int64, device=self.device)
        return self.forward(input_ids, position_ids, meta, rows)[0]  # [S, V]

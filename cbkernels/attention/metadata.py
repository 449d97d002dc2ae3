"""What one engine step tells every attention layer: host-side plan and device metadata.

``StepPlan`` is the step in host integers (token ids, positions, lengths, block tables and
slots per layer group), built by the model runner from its scheduled requests. A backend
turns it into ``StepMetadata`` (tensors and host integers only), which travels to the
attention layers through the model's forward kwargs (``METADATA_KWARG``), never through
module state. Backends with extra per-step tensors subclass the metadata classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch


@dataclass(slots=True)
class StepPlan:
    """One packed step in host integers. Sequences with one query row come first."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    seq_lens: list[int]  # [B] KV length of each sequence, its new tokens included
    query_lens: list[int]  # [B] new tokens of each sequence
    tables: list[list[list[int]]]  # [groups][B][blocks] block table of each sequence
    slots: list[list[int]]  # [groups][T] cache slot of each new token, -1: padding row
    windows: list[Optional[int]]  # [groups] sliding window of the group (None: full)
    block_size: int
    num_decodes: int  # the first num_decodes sequences have exactly one query row
    # Static shapes for CUDA-graph buckets: block tables padded to this width (with
    # ``table_fill[group]``, else 0), and max_seqlen_k fixed to width * block_size.
    table_width: Optional[int] = None
    table_fill: list[int] = field(default_factory=list)

    @property
    def padded(self) -> bool:
        return self.table_width is not None

    @property
    def cu_seqlens_q(self) -> list[int]:
        cu = [0]
        for n in self.query_lens:
            cu.append(cu[-1] + n)
        return cu

    @property
    def max_seqlen_k(self) -> int:
        if self.table_width is not None:
            return self.table_width * self.block_size
        return max(self.seq_lens)

    def prefill_spans(self) -> list[tuple[int, int, int]]:
        """(first row, end row, KV length) of every sequence after the decodes."""
        cu = self.cu_seqlens_q
        return [(cu[b], cu[b + 1], self.seq_lens[b]) for b in range(self.num_decodes, len(self.seq_lens))]


@dataclass(slots=True)
class GroupMetadata:
    """Kernel arguments of one layer group (full attention, or one sliding window)."""

    slot_mapping: torch.Tensor  # [T] int64, -1: padding row (never written)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    sliding_window: Optional[int]


@dataclass(slots=True)
class StepMetadata:
    groups: list[GroupMetadata]
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    num_decodes: int
    prefill_spans: list[tuple[int, int, int]]  # host ints, see StepPlan.prefill_spans
    padded: bool  # slot_mapping may hold -1 (padding rows of a CUDA-graph bucket)

    def copy_(self, other: "StepMetadata") -> None:
        """Overwrite this metadata's tensors in place with ``other``'s (same shapes): the
        static buffers a captured CUDA graph reads."""
        _copy_tensors(self, other)
        for mine, theirs in zip(self.groups, other.groups):
            _copy_tensors(mine, theirs)


def _copy_tensors(dst, src) -> None:
    for f in fields(dst):
        a, b = getattr(dst, f.name), getattr(src, f.name)
        if isinstance(a, torch.Tensor):
            a.copy_(b)
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for x, y in zip(a, b):
                x.copy_(y)


def shared_tensors(plan: StepPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """seq_lens [B] and cu_seqlens_q [B + 1], int32 on ``device``: the width the kernels take."""
    host = torch.tensor(plan.seq_lens + plan.cu_seqlens_q, dtype=torch.int32)
    dev = host.to(device)
    return dev[:len(plan.seq_lens)], dev[len(plan.seq_lens):]


def table_tensor(plan: StepPlan, group: int) -> torch.Tensor:
    """[B, width] int32 on the host: each row's table, padded with ``plan.table_fill``."""
    tables = plan.tables[group]
    fill = plan.table_fill[group] if plan.table_fill else 0
    width = plan.table_width if plan.table_width is not None else max(len(t) for t in tables)
    return torch.tensor([t + [fill] * (width - len(t)) for t in tables], dtype=torch.int32)

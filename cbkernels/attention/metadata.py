"""What one engine step tells every attention layer: host-side plan and device metadata.

``StepPlan`` is the step in host integers (token ids, positions, lengths, block tables and
slots per layer group), built by the model runner from its scheduled requests. A backend
turns it into ``StepMetadata`` (tensors and host integers only), which travels to the
attention layers through the model's forward kwargs (``METADATA_KWARG``), never through
module state. Backends with extra per-step tensors subclass the metadata classes.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field, fields
from itertools import accumulate
from typing import Optional

import torch


@dataclass(slots=True)
class StepPlan:
    """One packed step in host integers. Sequences with one query row come first.

    Block tables are not here: they live on the device (``block_tables``, one
    ``[rows, width]`` int32 table per layer group, see ``cbkernels.engine.block_tables``);
    each sequence names its row, and ``table_updates`` carries the entries to write first.
    """

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    seq_lens: list[int]  # [B] KV length of each sequence, its new tokens included
    query_lens: list[int]  # [B] new tokens of each sequence
    rows: list[int]  # [B] row of each sequence in the device block tables
    table_updates: list[int]  # (group, row, column, block id) quadruples, flattened
    windows: list[Optional[int]]  # [groups] sliding window of the group (None: full)
    block_size: int
    num_decodes: int  # the first num_decodes sequences have exactly one query row
    # CUDA-graph buckets: the last ``num_padding`` sequences are one-row padding (their slot
    # is -1: never written), and tables are cut to ``table_width`` columns so that shapes and
    # max_seqlen_k = table_width * block_size stay fixed. None: tight shapes.
    num_padding: int = 0
    table_width: Optional[int] = None
    # Asynchronous scheduling: input tokens still on the device. ``from_previous`` holds
    # (token index in this step, row of ``previous_tokens``) pairs, flattened; the input id at
    # each such index is taken from the previous step's sampled tokens (a device tensor).
    from_previous: list[int] = field(default_factory=list)
    previous_tokens: Optional[torch.Tensor] = None

    @property
    def padded(self) -> bool:
        return self.table_width is not None

    @property
    def cu_seqlens_q(self) -> list[int]:
        if self.num_decodes == len(self.query_lens):  # one token per sequence
            return list(range(len(self.query_lens) + 1))
        return list(accumulate(self.query_lens, initial=0))

    @property
    def max_seqlen_k(self) -> int:
        if self.table_width is not None:
            return self.table_width * self.block_size
        return max(self.seq_lens)

    def prefill_spans(self) -> list[tuple[int, int, int]]:
        """(first row, end row, KV length) of every sequence after the decodes."""
        if self.num_decodes == len(self.seq_lens):
            return []
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
    input_ids: torch.Tensor  # [1, T] int64, the model's input
    position_ids: torch.Tensor  # [1, T] int64
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


class StepTensors:
    """A step plan's integers on the device, from ONE host-to-device copy: input ids,
    positions, seq_lens, cu_seqlens_q, table rows and table updates, packed in one int64
    buffer. On CUDA the buffer is pinned (torch's caching host allocator keeps it until the
    asynchronous copy has run), so the host goes on without waiting."""

    __slots__ = ("input_ids", "positions", "seq_lens", "cu_seqlens_q", "rows", "table_updates", "token_rows", "_host")

    def __init__(self, plan: StepPlan, device: torch.device, table_updates: list[int]):
        """``table_updates``: the plan's table updates as (flat index, block id) pairs."""
        cu = plan.cu_seqlens_q
        values = plan.input_ids + plan.positions + plan.seq_lens + cu + plan.rows + plan.from_previous + table_updates
        # array -> tensor without a per-element Python conversion (torch.tensor of a list is
        # several times slower at a few thousand ints); the tensor shares the array's memory.
        self._host = array("q", values)
        host = torch.frombuffer(self._host, dtype=torch.int64)
        if device.type == "cuda":
            pinned = torch.empty(host.shape, dtype=torch.int64, pin_memory=True)
            dev = pinned.copy_(host).to(device, non_blocking=True)
        else:
            dev = host
        t, b = len(plan.input_ids), len(plan.seq_lens)
        sizes = [t, t, 2 * b + 1, b, len(plan.from_previous)]
        ids, pos, lens_cu, rows, previous, updates = dev.split(sizes + [dev.numel() - sum(sizes)])
        if plan.from_previous:  # input ids still on the device: gathered from the last step's samples
            pairs = previous.view(-1, 2)
            ids.index_copy_(0, pairs[:, 0], plan.previous_tokens.index_select(0, pairs[:, 1]).to(ids.dtype))
        self.input_ids, self.positions, self.table_updates = ids, pos, updates
        lens_cu = lens_cu.to(torch.int32)  # seq_lens and cu_seqlens_q sit side by side: one conversion
        self.seq_lens, self.cu_seqlens_q = lens_cu[:b], lens_cu[b:]
        cu_dev = self.cu_seqlens_q
        self.rows = rows
        # The table row of every query token (its sequence's row), without a device sync.
        if t == b:  # one token per sequence (decodes)
            self.token_rows = rows
        else:
            self.token_rows = torch.repeat_interleave(rows, cu_dev[1:] - cu_dev[:-1], output_size=t)


def slot_mapping(tables: torch.Tensor, step: StepTensors, block_size: int, num_padding: int) -> torch.Tensor:
    """[T] int64 cache slot of every query token through its row of ``tables`` [rows, W];
    the last ``num_padding`` tokens (padding rows) get -1."""
    pos = step.positions
    blocks = tables[step.token_rows, pos // block_size].to(torch.int64)
    slots = blocks * block_size + pos % block_size
    if num_padding:
        slots[slots.shape[0] - num_padding:] = -1
    return slots

"""CUDA graphs for decode-only steps: one graph per padded batch-size bucket.

A decode-only step (every scheduled request has exactly one new token) is padded up to the
next bucket and runs on static, preallocated buffers that each step overwrites with
``copy_`` (no reallocation), so one captured graph per bucket replays every such step:

* buckets: 1, 2, 4, 8, then every multiple of 8 up to the largest batch (``bucket_sizes``).
  Small batches are where launch overhead dominates and where doubling costs few rows;
  past 8, steps of 8 keep the padding under 8 rows (under 50% at 16, 12.5% at 64). Graphs
  are captured lazily on first use and share one memory pool, so unused buckets cost nothing.
* static buffers per bucket: the input ids and positions, and the step metadata the
  attention backend built for the bucket's first step. Later steps build their metadata
  the same way (same padded shapes) and copy it into those buffers (``StepMetadata.copy_``),
  so a replay reads this step's tables, slots and lengths. Block tables are padded to a
  static width (the longest context the model takes).
* dummy rows (bucket - n of them): token 0 at position 0, slot -1 (``scatter_kv`` skips it,
  so they write nothing), seq_len 1, and a block table whose first entry is the block that
  holds the first real row's newest token. The one key a dummy row reads is therefore a slot
  its owner has already written this step or before: finite, never garbage or NaN. Rows do
  not mix in a decoder forward outside attention, and their logits are dropped.
* bounds: max_seqlen_q = 1 and max_seqlen_k = table width * block_size, host
  constants fixed at capture, so the attention launch grid (and its split-KV choice) never
  changes and nothing syncs. A step whose block tables are wider, or whose batch is larger
  than the largest bucket, runs eagerly, as do prefill and mixed steps.

The logits of a replay live in the graph's output buffer until the next replay of any
bucket (the graphs share a pool): the runner samples from them at once.

``capture=False`` (tests; the only mode on CPU) runs the same padded static-buffer forward
eagerly, so everything but the capture itself is tested without a GPU.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Optional

import torch

from ..attention.metadata import StepMetadata, StepPlan

# Powers of two up to here, then multiples of BUCKET_STEP (see the module docstring).
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 8
# Beyond a few hundred rows a decode step is compute-bound: launch overhead no longer matters.
MAX_GRAPH_BATCH = 512
# The device block-table row that every padding sequence of a bucket reads (never a request id:
# those are str ids the engine hands out or the caller chooses, and this one holds a NUL).
PADDING_ROW_ID = "\x00padding"


def resolve_use_cuda_graph(flag: Optional[bool], device: torch.device, backend: str) -> bool:
    """``BatchConfig.use_cuda_graph`` for a model on ``device`` running ``backend``."""
    if flag is None:
        return device.type == "cuda" and backend == "triton"
    if flag and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs a CUDA model, but the KV cache is on {device}")
    if flag and backend != "triton":
        raise ValueError(f"use_cuda_graph=True needs the Triton backend, got backend={backend!r}")
    return bool(flag)


def bucket_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes, ascending, the last one ``max_batch``."""
    sizes = [s for s in SMALL_BUCKETS if s < max_batch]
    sizes += range(SMALL_BUCKETS[-1] + BUCKET_STEP, max_batch, BUCKET_STEP)
    return sorted(set(sizes)) + [max_batch]


class DecodeGraphs:
    """Padded static-buffer decode steps of one ``ModelRunner``, captured per bucket."""

    def __init__(self, runner, max_batch: int, *, capture: bool = True):
        if capture and runner.device.type != "cuda":
            raise ValueError(f"use_cuda_graph needs a CUDA model, got device {runner.device}")
        self.runner = runner
        self.capture = capture
        self.buckets = bucket_sizes(max(1, min(max_batch, MAX_GRAPH_BATCH)))
        self.width = runner.cache.device_tables.width  # static block-table width of every bucket
        self.static: dict[int, StepMetadata] = {}  # bucket -> the metadata a replay reads
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.bucket_steps: Counter = Counter()
        self.disabled = False
        self.capture_bytes = 0  # device memory the captures reserved (their shared pool)

    # ------------------------------------------------------------------ eligibility
    def bucket_for(self, requests, num_tokens: list[int]) -> Optional[int]:
        """The bucket this step pads to, or None when it must run eagerly."""
        n = len(requests)
        if self.disabled or n == 0 or n > self.buckets[-1] or max(num_tokens) != 1:
            return None
        # A decode reads the table columns of its positions 0..num_computed; the static tables
        # hold ``width`` columns (one attribute per request, not a table lookup per group).
        if max(r.num_computed for r in requests) >= self.width * self.runner.cache.block_size:
            return None
        return next(b for b in self.buckets if b >= n)

    # ------------------------------------------------------------------ static inputs
    def padded_plan(self, requests, bucket: int) -> StepPlan:
        """The step's plan padded to ``bucket`` rows and the static table width."""
        plan = self.runner.plan(requests, [1] * len(requests))
        pad = bucket - len(requests)
        tables = self.runner.cache.device_tables
        # Dummy rows read slot 0 of the block holding real row 0's newest token (see above):
        # one table row, written this step, that every padding sequence points at.
        dummy = tables.row(PADDING_ROW_ID)
        newest = plan.positions[0] // plan.block_size
        for g, alloc in enumerate(self.runner.cache.allocators):
            plan.table_updates += (g, dummy, 0, alloc.block_table(requests[0].request_id)[newest])
        plan.input_ids += [0] * pad
        plan.positions += [0] * pad
        plan.seq_lens += [1] * pad
        plan.query_lens += [1] * pad
        plan.rows += [dummy] * pad
        plan.num_decodes = bucket
        plan.num_padding = pad
        plan.table_width = self.width
        return plan

    def _fill(self, requests, bucket: int) -> None:
        meta = self.runner.backend.build(self.padded_plan(requests, bucket))
        static = self.static.get(bucket)
        if static is None:
            self.static[bucket] = meta
        else:
            static.copy_(meta)

    def _forward(self, bucket: int) -> torch.Tensor:
        """Logits [1, bucket, V] of the padded step held in the static buffers."""
        return self.runner.forward(self.static[bucket], 0)

    # ------------------------------------------------------------------ capture and replay
    def _capture(self, bucket: int) -> Optional[tuple]:
        """Warm up on a side stream (first Triton launches compile), then capture. The
        warm-up is a real forward of this step: its K/V writes are the ones the replay
        repeats, so it changes nothing. The split-KV workspace was sized when the bucket's
        metadata was built, before capture, and the backend keeps it alive."""
        device = self.runner.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        reserved = torch.cuda.memory_reserved(device)
        try:
            # thread_local: the engine may step on a serving thread while other threads run.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(bucket)
        except RuntimeError as err:
            self.disabled = True
            warnings.warn(f"CUDA graph capture of decode bucket {bucket} failed, decode steps run eagerly: {err}",
                          RuntimeWarning, stacklevel=3)
            return None
        self.capture_bytes += torch.cuda.memory_reserved(device) - reserved
        self.graphs[bucket] = (graph, logits)
        return self.graphs[bucket]

    def run(self, requests, bucket: int) -> Optional[torch.Tensor]:
        """Logits [n, V] of the n real rows, or None when capture failed (run eagerly)."""
        self._fill(requests, bucket)
        if not self.capture:
            logits = self._forward(bucket)
        else:
            entry = self.graphs.get(bucket) or self._capture(bucket)
            if entry is None:
                return None
            entry[0].replay()
            logits = entry[1]
        self.bucket_steps[bucket] += 1
        return logits[0, :len(requests)]

    def stats(self) -> dict:
        return {"cuda_graph_steps": sum(self.bucket_steps.values()), "cuda_graphs_captured": len(self.graphs),
                "cuda_graph_buckets": dict(sorted(self.bucket_steps.items())),
                "cuda_graph_largest_bucket": self.buckets[-1], "cuda_graph_memory_mib": self.capture_bytes / 2**20}

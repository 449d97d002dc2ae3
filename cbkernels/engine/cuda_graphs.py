"""CUDA graphs for decode-only steps: one graph per padded batch-size bucket.

A decode-only step (every scheduled request has exactly one new token) is padded up to the
next bucket and runs on static, preallocated buffers that each step overwrites with
``copy_`` (no reallocation), so one captured graph per bucket replays every such step:

* buckets: 1, 2, 4, 8, then every multiple of 8 up to the largest batch (``bucket_sizes``).
  Small batches are where launch overhead dominates and where doubling costs few rows;
  past 8, steps of 8 keep the padding under 8 rows (under 50% at 16, 12.5% at 64). Graphs
  are captured lazily on first use and share one memory pool, so unused buckets cost nothing.
* static buffers, sized for the largest bucket: input ids, positions, seq_lens and each
  layer group's slot mapping (one int64 tensor, one host-to-device copy per step), each
  group's block table ``[max_batch, max_blocks_per_seq]`` (only the columns in use this step
  are copied; the kernel never reads past a row's last used block), and cu_seqlens_q =
  0..B (constant: one query row per sequence).
* dummy rows (bucket - n of them): token 0 at position 0, slot -1 (``scatter_kv`` skips it,
  so they write nothing), seq_len 1, and a block table whose first entry is the block that
  holds the first real row's newest token. The one key a dummy row reads is therefore a slot
  its owner has already written this step or before: finite, never garbage or NaN. Rows do
  not mix in a decoder forward outside attention, and their logits are dropped.
* bounds: max_seqlen_q = 1 and max_seqlen_k = max_blocks_per_seq * block_size, host
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

# Powers of two up to here, then multiples of BUCKET_STEP (see the module docstring).
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 8
# Beyond a few hundred rows a decode step is compute-bound: launch overhead no longer matters.
MAX_GRAPH_BATCH = 512
# Context bound when the model config names none (the fallback of PagedAttentionCache.for_model).
DEFAULT_MAX_CONTEXT = 8192


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


def max_blocks_per_seq(model, cache) -> int:
    """Static block-table width: the longest context the model takes; with full attention
    only, also no more blocks than the cache has (sliding rings keep stale columns, so their
    tables grow with the sequence, not with the ring)."""
    mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_len = getattr(mc, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    width = -(-max_len // cache.block_size)
    if all(a.sliding_window is None for a in cache.allocators):
        width = min(width, cache.num_blocks)
    return width


class DecodeGraphs:
    """Padded static-buffer decode steps of one ``ModelRunner``, captured per bucket."""

    def __init__(self, runner, max_batch: int, *, capture: bool = True):
        if capture and runner.device.type != "cuda":
            raise ValueError(f"use_cuda_graph needs a CUDA model, got device {runner.device}")
        self.runner = runner
        self.capture = capture
        self.buckets = bucket_sizes(max(1, min(max_batch, MAX_GRAPH_BATCH)))
        cache, dev = runner.cache, runner.device
        self.width = max_blocks_per_seq(runner.model, cache)
        self.max_seqlen_k = self.width * cache.block_size
        top, groups = self.buckets[-1], len(cache.allocators)
        with torch.inference_mode():
            # Rows: 0 input ids, 1 positions, 2 seq_lens, 3 + g slot mapping of group g.
            self.ints = torch.zeros(3 + groups, top, dtype=torch.int64, device=dev)
            self.cu_seqlens_q = torch.arange(top + 1, dtype=torch.int64, device=dev)
            self.tables = [torch.zeros(top, self.width, dtype=torch.int32, device=dev) for _ in range(groups)]
            # The PyTorch backend gathers each decode row's whole (static-width) history.
            self.decode_slots, self.decode_mask = [], []
            if runner.backend == "torch":
                for _ in range(groups):
                    self.decode_slots.append(torch.zeros(top, self.max_seqlen_k, dtype=torch.int64, device=dev))
                    self.decode_mask.append(torch.zeros(top, 1, 1, self.max_seqlen_k, dtype=torch.bool, device=dev))
        self.metadata: dict[int, object] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.keep_alive: list[torch.Tensor] = []
        self.bucket_steps: Counter = Counter()
        self.disabled = False

    # ------------------------------------------------------------------ eligibility
    def bucket_for(self, requests, num_tokens: list[int]) -> Optional[int]:
        """The bucket this step pads to, or None when it must run eagerly."""
        n = len(requests)
        if self.disabled or n == 0 or n > self.buckets[-1] or any(t != 1 for t in num_tokens):
            return None
        for alloc in self.runner.cache.allocators:
            if any(len(alloc.block_table(r.request_id)) > self.width for r in requests):
                return None
        return next(b for b in self.buckets if b >= n)

    # ------------------------------------------------------------------ static inputs
    def _fill(self, requests, bucket: int) -> None:
        cache, n = self.runner.cache, len(requests)
        bs, pad = cache.block_size, bucket - n
        positions = [r.num_computed for r in requests]
        rows = [[r.tokens[p] for r, p in zip(requests, positions)] + [0] * pad,
                positions + [0] * pad,
                [p + 1 for p in positions] + [1] * pad]
        for g, alloc in enumerate(cache.allocators):
            tables = [alloc.block_table(r.request_id) for r in requests]
            rows.append([t[p // bs] * bs + p % bs for t, p in zip(tables, positions)] + [-1] * pad)
            # Dummy rows read slot 0 of the block holding real row 0's newest token.
            anchor = tables[0][positions[0] // bs]
            used = max(len(t) for t in tables)
            host = torch.tensor([t + [anchor] * (used - len(t)) for t in tables] + [[anchor] * used] * pad,
                                dtype=torch.int32)
            self.tables[g][:bucket, :used].copy_(host)
            if self.decode_slots:
                self._fill_torch_extras(g, host, rows[2], alloc.sliding_window, anchor, bucket)
        self.ints[:, :bucket].copy_(torch.tensor(rows, dtype=torch.int64))

    def _fill_torch_extras(self, g: int, table, lens: list[int], window, anchor: int, bucket: int) -> None:
        from .model_runner import _positions_to_slots

        bs = self.runner.cache.block_size
        full = torch.full((bucket, self.width), anchor, dtype=torch.int32)
        full[:, :table.shape[1]] = table
        pos = torch.arange(self.max_seqlen_k)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        visible = pos[None, :] < lens_t[:, None]
        if window is not None:
            visible &= pos[None, :] > lens_t[:, None] - 1 - window
        self.decode_slots[g][:bucket].copy_(_positions_to_slots(full, pos, bs))
        self.decode_mask[g][:bucket].copy_(visible[:, None, None, :])

    def _metadata(self, bucket: int):
        from .model_runner import GroupMetadata, PagedMetadata

        meta = self.metadata.get(bucket)
        if meta is None:
            cache, groups = self.runner.cache, []
            for g, alloc in enumerate(cache.allocators):
                group = GroupMetadata(self.ints[3 + g, :bucket], self.tables[g][:bucket], alloc.sliding_window,
                                      prefix_slots=[])
                if self.decode_slots:
                    group.decode_slots, group.decode_mask = self.decode_slots[g][:bucket], self.decode_mask[g][:bucket]
                groups.append(group)
            meta = PagedMetadata(cache, groups, self.ints[2, :bucket], self.cu_seqlens_q[:bucket + 1], 1,
                                 self.max_seqlen_k, bucket, [], self.runner.backend, padded=True)
            self.metadata[bucket] = meta
        meta.layers_seen = 0
        return meta

    def _forward(self, bucket: int) -> torch.Tensor:
        """Logits [1, bucket, V] of the padded step held in the static buffers."""
        return self.runner.forward(self.ints[0:1, :bucket], self.ints[1:2, :bucket], self._metadata(bucket), 0)

    # ------------------------------------------------------------------ capture and replay
    def _capture(self, bucket: int) -> Optional[tuple]:
        """Warm up on a side stream (first Triton launches compile, the split-KV scratch grows),
        then capture. The warm-up is a real forward of this step: its K/V writes are the
        ones the replay repeats, so it changes nothing."""
        from cbkernels.kernels import paged_attention as pa

        device = self.runner.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the engine may step on a serving thread while other threads run.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(bucket)
        except RuntimeError as err:
            self.disabled = True
            warnings.warn(f"CUDA graph capture of decode bucket {bucket} failed, decode steps run eagerly: {err}",
                          RuntimeWarning, stacklevel=3)
            return None
        # The graph baked in the split-KV scratch it saw; a later, larger launch replaces the
        # module's buffer, so hold every one a graph may point into.
        self.keep_alive.extend(pa._SCRATCH.values())
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
                "cuda_graph_buckets": dict(sorted(self.bucket_steps.items()))}

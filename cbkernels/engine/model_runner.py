"""Run one scheduled step: order its rows, plan it, one packed forward, sample.

The batch is a single row ``[1, T]`` of every scheduled request's new tokens back to back
(one-token decodes first, then prefill chunks): no padding. The runner turns the requests
into a host ``StepPlan``, its attention backend turns that into device metadata, and both
reach every attention layer through the model's forward kwargs, never through module state.
Decode-only steps may instead replay a CUDA graph (``cuda_graphs.DecodeGraphs``).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import StepMetadata, StepPlan
from .cuda_graphs import DecodeGraphs, resolve_use_cuda_graph
from .requests import Request
from .overlap import InFlightStep, sample_on_device
from .sampling import sample

# A 4-D mask makes transformers' mask builders return it untouched (they treat 4-D masks as
# already prepared), so a paged step builds no [T, T] mask; the attention function ignores it.
_NO_MASK_SHAPE = (1, 1, 1, 1)


class ModelRunner:
    """``use_cuda_graph`` follows ``BatchConfig.use_cuda_graph`` (None: on for CUDA with the
    Triton backend); ``max_num_seqs`` bounds the largest decode graph."""

    def __init__(self, model, cache, backend: AttentionBackend, generator: Optional[torch.Generator],
                 *, use_cuda_graph: Optional[bool] = False, max_num_seqs: Optional[int] = None):
        self.model = model
        self.cache = cache
        self.backend = backend
        self.generator = generator
        self.device = cache.kv.device
        self._no_mask = torch.ones(_NO_MASK_SHAPE, dtype=torch.bool, device=self.device)
        self.graphs: Optional[DecodeGraphs] = None
        self.eager_steps = 0
        # Asynchronous scheduling: the last launched step whose tokens are still on the device.
        self.previous: Optional[InFlightStep] = None
        # Seconds of the current step (reset by ``reset_timing``): prepare (plan + metadata),
        # forward, sample, and device_wait: the host waiting for the device (CUDA: before it
        # samples, and for an in-flight step's tokens). The forward's share is device work on
        # a CPU; the forward and the waits aside, everything is host work per step.
        self.timing = {"prepare": 0.0, "forward": 0.0, "sample": 0.0, "device_wait": 0.0}
        if resolve_use_cuda_graph(use_cuda_graph, self.device, backend.name):
            limit = cache.max_batch_tokens if max_num_seqs is None else min(max_num_seqs, cache.max_batch_tokens)
            self.graphs = DecodeGraphs(self, limit)

    def plan(self, requests: list[Request], num_tokens: list[int]) -> StepPlan:
        """Host plan of a step; ``requests`` must list one-row requests first. Work per
        request is O(1) for a decode (block tables stay on the device; only entries appended
        since the last step are sent)."""
        num_decodes = len(num_tokens) if max(num_tokens, default=1) == 1 else next(
            i for i, n in enumerate(num_tokens) if n != 1)
        decodes = requests[:num_decodes] if num_decodes < len(requests) else requests
        positions = [req.num_computed for req in decodes]  # one token each, at its next position
        seq_lens = [p + 1 for p in positions]
        from_previous = []
        try:
            ids = [req.tokens[p] for req, p in zip(decodes, positions)]
        except IndexError:  # some inputs are tokens the last step sampled, still on the device
            previous_rows = self.previous.rows_of
            ids = []
            for i, (req, p) in enumerate(zip(decodes, positions)):
                if p == len(req.tokens):
                    from_previous += (i, previous_rows[req])
                    ids.append(0)
                else:
                    ids.append(req.tokens[p])
        for req, n in zip(requests[num_decodes:], num_tokens[num_decodes:]):  # prefill chunks
            start = req.num_computed
            ids += req.tokens[start:start + n]
            positions += range(start, start + n)
            seq_lens.append(start + n)
        updates = []
        allocators = self.cache.allocators
        rows = self.cache.device_tables.sync_rows([r.request_id for r in requests], allocators, updates)
        return StepPlan(ids, positions, seq_lens, list(num_tokens), rows, updates,
                        [a.sliding_window for a in allocators], self.cache.block_size,
                        num_decodes=num_decodes, from_previous=from_previous,
                        previous_tokens=self.previous.tokens if from_previous else None)

    def forward(self, meta: StepMetadata, logits_to_keep) -> torch.Tensor:
        """Model forward over one packed step (inputs in ``meta``): logits [1, S, V]."""
        self.backend.layer_calls = 0
        start = time.perf_counter()
        out = self.model(input_ids=meta.input_ids, position_ids=meta.position_ids, attention_mask=self._no_mask,
                         use_cache=False, logits_to_keep=logits_to_keep, **self.backend.forward_kwargs(meta))
        if self.backend.layer_calls != self.cache.num_layers:
            raise RuntimeError(
                f"{self.backend.layer_calls} of {self.cache.num_layers} attention layers ran the paged path: the "
                "model's attention modules do not dispatch through config._attn_implementation='cbkernels'")
        self.timing["forward"] += time.perf_counter() - start
        return out.logits

    def graph_stats(self) -> dict:
        """Steps that ran the padded decode path (graph replays) vs eagerly."""
        stats = {"eager_steps": self.eager_steps, "cuda_graph_steps": 0, "cuda_graphs_captured": 0,
                 "cuda_graph_largest_bucket": 0, "cuda_graph_memory_mib": 0.0}
        if self.graphs is not None:
            stats.update(self.graphs.stats())
        return stats

    def reset_timing(self) -> None:
        self.timing = dict.fromkeys(self.timing, 0.0)

    def _forward_batch(self, batch):
        """Copies, row order, forward: (order, requests in row order, sampling rows, logits [S, V])."""
        self.cache.apply_copies(batch.copies)
        if max(batch.num_tokens) == 1:  # decode-only: already one-row first
            order, requests, counts = range(len(batch.requests)), batch.requests, batch.num_tokens
        else:
            order = sorted(range(len(batch.requests)), key=lambda i: batch.num_tokens[i] != 1)  # one-row first
            requests = [batch.requests[i] for i in order]
            counts = [batch.num_tokens[i] for i in order]
        # The rows that end their request's known tokens sample (the scheduler counted them).
        if batch.samples == len(requests):
            sampling = range(len(requests))
        else:
            sampling = [i for i, (r, n) in enumerate(zip(requests, counts)) if n == r.remaining]
        bucket = self.graphs.bucket_for(requests, counts) if self.graphs is not None else None
        logits = self.graphs.run(requests, bucket) if bucket is not None else None
        if logits is not None:  # one row per request
            logits = logits if len(sampling) == len(requests) else logits[sampling]
        else:
            self.eager_steps += 1
            logits = self._eager(requests, counts, sampling)
        return order, requests, sampling, logits

    @torch.inference_mode()
    def launch(self, batch, *, on_device: bool = False) -> InFlightStep:
        """Run a scheduled batch (copy-on-write copies first) and sample. ``on_device``
        (asynchronous scheduling): the tokens stay on the device, with their copy to the host
        under way, and inputs still in flight from the previous launch are read there; a step
        whose rows need their history on the host (logits processors, log-probabilities)
        keeps its logits instead and is sampled by ``sample_on_host`` once the previous
        step's tokens are back. Otherwise the host samples at once."""
        start = time.perf_counter()
        order, requests, sampling, logits = self._forward_batch(batch)
        sampled_at = time.perf_counter()
        rows = requests if len(sampling) == len(requests) else [requests[i] for i in sampling]
        tokens = sample_on_device(logits, rows, self.generator) if on_device and sampling else None
        step = InFlightStep(batch, order, sampling, rows, logits, tokens)
        self.previous = step if tokens is not None else None
        if not on_device:
            self.sample_on_host(step)
        self.timing["sample"] = time.perf_counter() - sampled_at - self.timing["device_wait"]
        self.timing["prepare"] = sampled_at - start - self.timing["forward"]
        return step

    def sample_on_host(self, step: InFlightStep) -> None:
        """The host sampling of a step (its rows' histories complete). On CUDA the wait for
        the forward is timed apart (``device_wait``), so ``sample`` is the sampling's own time."""
        if step.rows and step.logits.is_cuda:
            start = time.perf_counter()
            torch.cuda.current_stream(step.logits.device).synchronize()
            self.timing["device_wait"] += time.perf_counter() - start
        step.host_tokens = sample(step.logits, step.rows, self.generator) if step.rows else []

    def _eager(self, requests: list[Request], num_tokens: list[int], sampling: list[int]) -> torch.Tensor:
        plan = self.plan(requests, num_tokens)
        meta = self.backend.build(plan)
        if len(sampling) == len(requests) and plan.num_decodes == len(requests):
            keep = 0  # one row per sequence, every one samples: all rows (transformers' logits_to_keep=0)
        elif len(sampling) == len(requests):  # every sequence samples its last row: derived on the device
            keep = meta.cu_seqlens_q[1:].to(torch.int64) - 1
        else:
            cu = plan.cu_seqlens_q  # host ints: no device-to-host read
            rows = [cu[i + 1] - 1 for i in sampling] or [0]  # [0]: logits unused
            keep = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)
        return self.forward(meta, keep)[0]  # [S, V]

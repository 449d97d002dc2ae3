"""``Engine``: continuous batching over the paged cache.

Each ``step()``: the scheduler picks requests and token counts -> copy-on-write copies ->
one packed model forward (``ModelRunner``) -> sampled tokens update the request states ->
finished requests free their blocks. ``generate()`` runs steps until every request is done;
``add_request`` / ``stream`` / ``cancel`` / ``get_result`` serve requests one by one.
"""
from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from .cache import PagedAttentionCache
from .config import BatchConfig
from .integration import NAME, register
from .metrics import EngineMetrics
from .model_runner import ModelRunner
from .requests import Request, RequestOutput, RequestStatus as S, SamplingParams
from .scheduler import make_scheduler


def _resolve_backend(config: BatchConfig, device: torch.device) -> str:
    if config.backend != "auto":
        return config.backend
    from .ops import use_triton

    return "triton" if use_triton(torch.empty(0, device=device)) else "torch"


class Engine:
    def __init__(self, model, config: Optional[BatchConfig] = None):
        register()
        self.model = model
        self.config = config if config is not None else BatchConfig()
        self.cache = PagedAttentionCache.for_model(model, self.config)
        device = self.cache.kv.device
        self.backend = _resolve_backend(self.config, device)
        self.generator = None
        if self.config.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)
        self.scheduler = make_scheduler(self.config.scheduler, self.cache, self.config.max_batch_tokens,
                                        self.config.max_num_seqs)
        self.runner = ModelRunner(model, self.cache, self.backend, self.generator)
        self.requests: dict[str, Request] = {}
        self._stats = EngineMetrics()
        self._ids = itertools.count()
        self._saved_attn: Optional[str] = None

    # ---------------------------------------------------------------- attention switch
    def _activate(self) -> None:
        current = self.model.config._attn_implementation
        if self._saved_attn is None and current != NAME:
            self._saved_attn = current
            self.model.set_attn_implementation(NAME)

    def _restore(self) -> None:
        if self._saved_attn is not None:
            self.model.set_attn_implementation(self._saved_attn)
            self._saved_attn = None

    @contextmanager
    def _attention(self):
        self._activate()
        try:
            yield
        finally:
            self._restore()

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids: Sequence[int], generation_config=None, request_id: Optional[str] = None) -> str:
        gc = generation_config if generation_config is not None else self.model.generation_config
        params = SamplingParams.from_generation_config(gc)
        index = next(self._ids)
        rid = request_id if request_id is not None else f"req-{index}"
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(rid, len(prompt_ids), [int(t) for t in prompt_ids], params, arrival_index=index)
        self.requests[rid] = req
        if not prompt_ids:
            req.fail("empty prompt")
            self._stats.record_request(req.to_output())
        elif params.max_new_tokens < 1:
            req.transition(S.FINISHED)
            req.finish_reason, req.finish_time = "length", time.perf_counter()
        else:
            self.scheduler.add(req)
        return rid

    def cancel(self, request_id: str) -> None:
        req = self.requests[request_id]
        if req.is_done:
            return
        self.scheduler.finish(req)
        req.transition(S.FINISHED)
        req.finish_reason, req.finish_time = "cancelled", time.perf_counter()

    def get_result(self, request_id: str) -> RequestOutput:
        return self.requests[request_id].to_output()

    def stream(self, request_id: str) -> Iterator[int]:
        """New tokens of one request as they are generated (drives the engine)."""
        req = self.requests[request_id]
        seen = 0
        while True:
            gen = req.generated
            yield from gen[seen:]
            seen = len(gen)
            if req.is_done or not self.scheduler.has_work():
                return
            self.step()

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[tuple[str, int]]:
        """One scheduling step and forward; returns the (request_id, token) pairs it made."""
        start = time.perf_counter()
        self._activate()
        batch = self.scheduler.schedule()
        for req in batch.failed:
            self._stats.record_request(req.to_output())
        if not batch.requests:
            self._unstick()
            return []
        self.cache.apply_copies(batch.copies)
        order = sorted(range(len(batch)), key=lambda i: batch.num_tokens[i] != 1)  # one-row first
        reqs = [batch.requests[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]
        sampled = self.runner.step(reqs, counts)
        now = time.perf_counter()
        made = []
        for i, (req, n) in enumerate(zip(reqs, counts)):
            req.num_computed += n
            self.cache.commit(req)
            if i not in sampled:
                req.transition(S.SPLIT_PENDING_REMAINDER)
                continue
            req.append_token(sampled[i], now)
            made.append((req.request_id, sampled[i]))
            req.transition(S.DECODING)
            reason = req.stop_reason()
            if reason is not None:
                req.transition(S.FINISHED)
                req.finish_reason, req.finish_time = reason, now
                self.scheduler.finish(req)
                self._stats.record_request(req.to_output())
        self._stats.record_step(counts, len(made), len(batch.preempted), time.perf_counter() - start)
        if not self.scheduler.has_work():
            self._restore()
        return made

    def _unstick(self) -> None:
        """Nothing could be scheduled: if nothing runs either, the head request can never
        get its blocks (the cache is as free as it gets), so it fails with a reason."""
        if self.scheduler.running or not self.scheduler.waiting:
            if not self.scheduler.has_work():
                self._restore()
            return
        req = self.scheduler.waiting.popleft()
        req.fail(f"request cannot be scheduled: needs {self.cache.blocks_needed(req, 1)}+ blocks, "
                 f"{self.cache.get_num_free_blocks()} of {self.cache.num_blocks} free")
        self.cache.release(req)
        self._stats.record_request(req.to_output())

    def generate(self, inputs: Sequence[Sequence[int]], generation_config=None) -> list[RequestOutput]:
        """Generate for every prompt (lists of token ids); outputs in input order. Errors
        do not raise: they land on the output's ``.error``."""
        with self._attention():
            ids = [self.add_request(p, generation_config) for p in inputs]
            while self.scheduler.has_work():
                self.step()
        return [self.get_result(rid) for rid in ids]

    def metrics(self) -> dict:
        return self._stats.snapshot(active=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                                    cache=self.cache)


def generate_batch(model, inputs, generation_config=None, config: Optional[BatchConfig] = None) -> list[RequestOutput]:
    """One-shot ``Engine(model, config).generate(inputs, generation_config)``."""
    return Engine(model, config).generate(inputs, generation_config)

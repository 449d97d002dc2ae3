"""``Engine``: continuous batching over the paged cache.

Each ``step()`` reads schedule -> run -> postprocess: the scheduler picks requests and
token counts, the model runner does the copy-on-write copies, one packed forward and the
sampling, and the scheduler moves every request on with its sampled token (finished
requests free their blocks). ``generate()`` runs steps until every request is done;
``add_request`` / ``stream`` / ``cancel`` / ``get_result`` serve requests one by one.

Reliability contract:

* Engine-level misuse raises before anything is scheduled: ``TypeError`` for inputs that
  are not lists of int token ids or a ``generation_config`` that is not a GenerationConfig,
  ``ValueError`` for out-of-range sampling numbers or a reused ``request_id``, ``KeyError``
  for an unknown ``request_id`` (see ``cbkernels.engine.inputs``).
* A problem of one prompt (empty, a token id outside the vocabulary, longer than the
  model's positions or the cache, ``max_new_tokens <= 0``) makes that request FAILED with a
  reason on ``.error``; the others run.
* An exception inside a step (model forward, sampling) fails exactly that step's requests
  with the error text, frees their blocks, and the engine keeps serving. A
  ``KeyboardInterrupt`` (any ``BaseException``) does the same, then propagates; inside
  ``generate`` the call's unfinished requests are failed and freed and the model's
  attention implementation is restored, so the engine stays reusable.
* Thread safety: one lock guards the scheduler and request state. ``start()`` runs the
  steps in a background thread; then ``add_request`` / ``cancel`` / ``stream`` /
  ``generate`` may be called from any thread (``stream`` waits on a condition variable).
"""
from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..attention.integration import NAME, register
from ..attention.registry import make_backend
from .cache import PagedAttentionCache
from .config import BatchConfig
from .inputs import check_generation_config, check_inputs, check_prompt, prompt_problem
from .metrics import EngineMetrics
from .model_config import text_config
from .model_runner import ModelRunner
from .requests import Request, RequestOutput, SamplingParams
from .scheduler import make_scheduler
from .serving import WAIT_RECHECK_S, ServingLoop


class Engine:
    def __init__(self, model, config: Optional[BatchConfig] = None):
        if config is not None and not isinstance(config, BatchConfig):
            raise TypeError(f"config must be a cbkernels.BatchConfig or None, got {type(config).__name__}")
        register()
        self.model = model
        self.config = config if config is not None else BatchConfig()
        self.cache = PagedAttentionCache.for_model(model, self.config)
        mc = text_config(model)
        self.attention = make_backend(self.config.backend, self.cache, mc.num_attention_heads)
        self.backend = self.attention.name
        self.generator = None
        if self.config.seed is not None:
            self.generator = torch.Generator(device=self.cache.kv.device).manual_seed(self.config.seed)
        self.scheduler = make_scheduler(self.config.scheduler, self.cache, self.config.max_batch_tokens,
                                        self.config.max_num_seqs)
        self.runner = ModelRunner(model, self.cache, self.attention, self.generator,
                                  use_cuda_graph=self.config.use_cuda_graph, max_num_seqs=self.config.max_num_seqs)
        self.requests: dict[str, Request] = {}
        self._stats = EngineMetrics()
        self._ids = itertools.count()
        self._saved_attn: Optional[str] = None
        self._vocab_size = getattr(mc, "vocab_size", None)
        self._max_positions = getattr(mc, "max_position_embeddings", None)
        self.num_steps = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified after every state change
        self._loop = ServingLoop(self.step, self.scheduler.has_work, self._changed)
        # Seconds of the last step by phase (schedule, prepare, forward, sample, postprocess).
        self.last_step_timing: dict[str, float] = {}

    # ---------------------------------------------------------------- serving loop
    def start(self) -> "Engine":
        """Run steps in a background thread until ``stop()`` (also a context manager)."""
        self._loop.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the serving loop after its current step; queued requests stay queued."""
        self._loop.stop(timeout)
        with self._lock:
            self._restore()

    @property
    def loop_error(self) -> Optional[BaseException]:
        """The exception that ended the serving loop, if one did."""
        return self._loop.error

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

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
            with self._lock:
                if not self._loop.runs_elsewhere():
                    self._restore()

    # ---------------------------------------------------------------- requests
    def _params(self, generation_config) -> SamplingParams:
        gc = generation_config if generation_config is not None else self.model.generation_config
        check_generation_config(gc)
        return SamplingParams.from_generation_config(gc)

    def _request(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except (KeyError, TypeError):
            raise KeyError(f"unknown request_id {request_id!r}") from None

    def add_request(self, prompt_ids: Sequence[int], generation_config=None, request_id: Optional[str] = None) -> str:
        """Queue one prompt; returns its id. Raises TypeError/ValueError for misuse (see the
        module docstring); a prompt that cannot run is recorded as FAILED with a reason."""
        tokens = check_prompt(prompt_ids)
        params = self._params(generation_config)
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
        with self._lock:
            return self._add(tokens, params, request_id)

    def _add(self, tokens: list[int], params: SamplingParams, request_id: Optional[str] = None) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        req = Request(rid, len(tokens), tokens, params, arrival_step=self.num_steps)
        self.requests[rid] = req
        problem = prompt_problem(tokens, params.max_new_tokens, vocab_size=self._vocab_size,
                                 max_positions=self._max_positions, can_ever_fit=self.cache.can_ever_fit)
        if problem is not None:
            req.fail(problem)
            self._stats.record_request(req.to_output())
        else:
            self.scheduler.add(req)
        self._changed.notify_all()
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is (waiting, prefilling, decoding) and free its blocks;
        a finished request is left as it is."""
        with self._lock:
            req = self._request(request_id)
            if not req.is_done:
                self.scheduler.cancel(req, time.perf_counter())
                self._changed.notify_all()

    def get_result(self, request_id: str) -> RequestOutput:
        with self._lock:
            return self._request(request_id).to_output()

    def pop_result(self, request_id: str) -> RequestOutput:
        """The output of a finished or failed request, which the engine then forgets: a
        long-running server calls this so finished requests do not accumulate."""
        with self._lock:
            req = self._request(request_id)
            if not req.is_done:
                raise ValueError(f"request_id {request_id!r} is still running ({req.status.name})")
            del self.requests[request_id]
            return req.to_output()

    def stream(self, request_id: str) -> Iterator[int]:
        """New tokens of one request as they are generated. Without a serving loop the
        caller drives the engine; with one (``start()``) it waits for the loop's steps."""
        with self._lock:
            req = self._request(request_id)
        seen = 0
        while True:
            with self._changed:
                while len(req.tokens) - req.prompt_len <= seen and not req.is_done:
                    if self._loop.runs_elsewhere():
                        self._changed.wait(WAIT_RECHECK_S)
                    elif self.scheduler.has_work():
                        self.step()
                    else:
                        break
                new = req.tokens[req.prompt_len + seen:]
                seen += len(new)
                done = req.is_done or not (self.scheduler.has_work() or self._loop.runs_elsewhere())
            yield from new
            if done:
                return

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[tuple[str, int]]:
        """One scheduling step and forward; returns the (request_id, token) pairs it made.
        An exception in the forward or sampling fails this step's requests (blocks freed)
        and is swallowed; a BaseException (KeyboardInterrupt) does the same, then propagates."""
        with self._changed:
            try:
                return self._step()
            finally:
                self._changed.notify_all()

    def _step(self) -> list[tuple[str, int]]:
        start = time.perf_counter()
        self._activate()
        # 1. schedule
        batch = self.scheduler.schedule()
        scheduled = time.perf_counter()
        self.num_steps += 1
        for req in batch.failed:
            self._stats.record_request(req.to_output())
        if not batch.requests:
            if not self.scheduler.has_work():
                self._restore()
            return []
        for req in batch.requests:
            if req.first_scheduled_time is None:
                req.first_scheduled_time, req.first_scheduled_step = start, self.num_steps - 1
        # 2. run
        try:
            sampled = self.runner.run(batch)
        except BaseException as exc:  # noqa: BLE001 - re-raised below unless an ordinary error
            self._fail_requests(batch.requests, f"step failed: {type(exc).__name__}: {exc}")
            if not isinstance(exc, Exception):
                raise
            self._stats.record_step(batch.num_tokens, 0, len(batch.preempted), time.perf_counter() - start,
                                    self.cache.num_used_blocks())
            return []
        # 3. postprocess
        ran = time.perf_counter()
        for req in self.scheduler.postprocess(batch, sampled, ran):
            self._stats.record_request(req.to_output())
        made = [(r.request_id, t) for r, t in zip(batch.requests, sampled) if t is not None]
        self.last_step_timing = {"schedule": scheduled - start, **self.runner.timing,
                                 "postprocess": time.perf_counter() - ran}
        self._stats.record_step(batch.num_tokens, len(made), len(batch.preempted), time.perf_counter() - start,
                                self.cache.num_used_blocks(), self.runner.timing["forward"])
        if not self.scheduler.has_work():
            self._restore()
        return made

    def _fail_requests(self, reqs, reason: str) -> None:
        """Fail every live request of ``reqs`` with ``reason`` and free its blocks."""
        for req in reqs:
            if not req.is_done:
                self.scheduler.fail(req, reason)
                self._stats.record_request(req.to_output())

    def generate(self, inputs: Sequence[Sequence[int]], generation_config=None, *,
                 progress_bar: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (lists of token ids); outputs in input order.

        Misuse of the call (``inputs`` not a list of int lists, a bad ``generation_config``)
        raises TypeError/ValueError before anything is queued. Problems of single prompts
        and faults during a step do not raise: they land on that output's ``.error``. An
        interrupt (KeyboardInterrupt) fails and frees this call's requests, then propagates.
        ``progress_bar`` shows a tqdm bar of finished requests on stderr."""
        prompts = check_inputs(inputs)
        params = self._params(generation_config)
        with self._lock:
            ids = [self._add(p, params) for p in prompts]
        reqs = [self.requests[rid] for rid in ids]
        try:
            with self._attention():
                self._drive_until_done(reqs, progress_bar)
        except BaseException as exc:
            with self._lock:
                self._fail_requests(reqs, f"generate interrupted: {type(exc).__name__}")
                self._changed.notify_all()
            raise
        # The outputs go to the caller; the engine keeps nothing of a finished generate call.
        return [self.pop_result(rid) for rid in ids]

    def _drive_until_done(self, reqs: list[Request], progress_bar: bool) -> None:
        import sys

        from tqdm import tqdm

        with self._changed, tqdm(total=len(reqs), desc="requests", unit="req", file=sys.stderr,
                                 disable=not progress_bar) as bar:
            while True:
                done = sum(r.is_done for r in reqs)
                bar.update(done - bar.n)
                if done == len(reqs):
                    return
                if self._loop.runs_elsewhere():
                    self._changed.wait(WAIT_RECHECK_S)
                elif self.scheduler.has_work():
                    self.step()
                else:  # cannot happen for live requests; never spin
                    raise RuntimeError("engine has live requests but no scheduled work")

    def metrics(self) -> dict:
        with self._lock:
            snapshot = self._stats.snapshot(active=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                                            cache=self.cache)
            snapshot.update(self.runner.graph_stats())
            return snapshot


def generate_batch(model, inputs, generation_config=None, config: Optional[BatchConfig] = None) -> list[RequestOutput]:
    """One-shot ``Engine(model, config).generate(inputs, generation_config)``."""
    return Engine(model, config).generate(inputs, generation_config)

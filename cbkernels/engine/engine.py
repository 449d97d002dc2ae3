"""``Engine``: continuous batching over the paged cache.

Each ``step()`` reads schedule -> run -> postprocess: the scheduler picks requests and
token counts, the model runner does the copy-on-write copies, one packed forward and the
sampling, and the scheduler moves every request on with its sampled token (finished
requests free their blocks). ``generate()`` runs steps until every request is done;
``add_request`` / ``stream`` / ``cancel`` / ``get_result`` serve requests one by one.

The reliability contract (what raises, what fails one request, what a fault in a step does,
which calls are thread-safe) is in docs/architecture.md, "What the engine promises".
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..attention.integration import AttentionSwitch, register
from ..attention.registry import make_backend
from .cache import PagedAttentionCache
from .cache_sizing import check_max_num_seqs, resolve_config
from .config import BatchConfig
from .cpu_malloc import keep_freed_memory
from .distributed import attach
from .hf_config import choose_config, engine_config
from .hf_generation import GenerationSpec
from .inputs import check_count, check_inputs, check_prompt, prompt_problem
from .metrics import EngineMetrics
from .model_config import text_config
from .model_runner import ModelRunner
from .requests import Request, RequestOutput
from .scheduler import make_scheduler
from .serving import WAIT_RECHECK_S, ServingLoop


class Engine:
    def __init__(self, model, config=None, *, tokenizer=None):
        """``config``: a ``BatchConfig``, transformers' ``ContinuousBatchingConfig`` (translated,
        see ``hf_config``) or None. ``tokenizer``: used for ``stop_strings``."""
        config, self.options = engine_config(model, config)
        self.tokenizer = tokenizer
        register()
        self.model = model
        requested = config if config is not None else BatchConfig()
        device = torch.device(requested.device) if requested.device is not None else next(model.parameters()).device
        # The effective configuration: device-dependent defaults filled in (cache_sizing).
        self.config = resolve_config(requested, device)
        self.cache = PagedAttentionCache.for_model(model, self.config)
        # On the CPU a step's large temporaries reuse heap memory instead of fresh pages (cpu_malloc.py).
        self.cpu_malloc = keep_freed_memory() if self.cache.kv.device.type == "cpu" else "not used (device memory)"
        self.config.max_num_seqs = check_max_num_seqs(requested.max_num_seqs, self.config.max_num_seqs,
                                                      self.cache.num_blocks)
        mc = text_config(model)
        self.attention = make_backend(self.config.backend, self.cache, self.cache.num_q_heads)
        self.backend = self.attention.name
        self.generator = None
        if self.config.seed is not None:
            self.generator = torch.Generator(device=self.cache.kv.device).manual_seed(self.config.seed)
        self.scheduler = make_scheduler(self.config.scheduler, self.cache, self.config.max_batch_tokens,
                                        self.config.max_num_seqs, admission=self.config.admission,
                                        target_itl_ms=self.config.target_itl_ms)
        self.runner = ModelRunner(model, self.cache, self.attention, self.generator,
                                  use_cuda_graph=self.config.use_cuda_graph, max_num_seqs=self.config.max_num_seqs)
        self.requests: dict[str, Request] = {}
        self._stats = EngineMetrics()
        self._ids = itertools.count()
        self._switch = AttentionSwitch(model)  # attn_implementation "cbkernels" while steps run
        self._vocab_size = getattr(mc, "vocab_size", None)
        self._max_positions = getattr(mc, "max_position_embeddings", None)
        self.num_steps = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified after every state change
        self._in_flight = None  # asynchronous scheduling: the launched step not yet read back
        self._loop = ServingLoop(self.step, self._has_work, self._changed)
        # Seconds of the last step by phase (schedule, prepare, forward, sample, postprocess).
        self.last_step_timing: dict[str, float] = {}
        self._tp = attach(self)  # tensor parallel: every rank runs rank 0's requests (engine/distributed.py)

    # ---------------------------------------------------------------- serving loop
    def start(self) -> "Engine":
        """Run steps in a background thread until ``stop()`` (also a context manager)."""
        self._loop.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the serving loop after its current step; queued requests stay queued."""
        self._loop.stop(timeout)
        with self._lock:
            self._switch.restore()

    @property
    def loop_error(self) -> Optional[BaseException]:
        """The exception that ended the serving loop, if one did."""
        return self._loop.error

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextmanager
    def _attention(self):
        self._switch.activate()
        try:
            yield
        finally:
            with self._lock:
                if not self._loop.runs_elsewhere():
                    self._switch.restore()

    # ---------------------------------------------------------------- requests
    def _spec(self, generation_config, tokenizer=None, return_logprobs=None, top_logprobs=0) -> GenerationSpec:
        if return_logprobs is not None and not isinstance(return_logprobs, bool):
            raise TypeError(f"return_logprobs must be True, False or None, got {return_logprobs!r}")
        check_count("top_logprobs", top_logprobs)
        return GenerationSpec(self.model, generation_config, tokenizer=tokenizer if tokenizer is not None else self.tokenizer,
                              strict=not self.options.drop_unsupported_processors, vocab_size=self._vocab_size,
                              return_logprobs=self.options.return_logprobs if return_logprobs is None else return_logprobs,
                              top_logprobs=top_logprobs)

    def sequence_ids(self, request_id: str) -> list[str]:
        """The ids of a request and of its num_return_sequences - 1 siblings, in output order."""
        with self._lock:
            self._request(request_id)
            return self._family_ids(request_id)

    def _request(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except (KeyError, TypeError):
            raise KeyError(f"unknown request_id {request_id!r}") from None

    def add_request(self, prompt_ids: Sequence[int], generation_config=None, request_id: Optional[str] = None, *,
                    return_logprobs: Optional[bool] = None, top_logprobs: int = 0, tokenizer=None,
                    priority: int = 0) -> str:
        """Queue one prompt; returns its id (with num_return_sequences = n, the first of
        ``sequence_ids(id)``). Raises TypeError/ValueError for misuse (see the module
        docstring), ``queue.Full`` past ``max_queue_size`` waiting requests; a prompt that
        cannot run is recorded as FAILED with a reason. ``return_logprobs`` (None: the
        engine's setting) / ``top_logprobs`` add log-probabilities to the output.
        ``priority``: an int, higher first (FIFO within a priority, with aging; docs/scheduling.md)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {type(priority).__name__}")
        tokens = check_prompt(prompt_ids)
        spec = self._spec(generation_config, tokenizer, return_logprobs, top_logprobs)
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
        with self._lock:
            limit = self.options.max_queue_size
            if limit and len(self.scheduler.waiting) >= limit:
                raise queue.Full(f"{len(self.scheduler.waiting)} requests are waiting: max_queue_size is {limit}")
            return self._add(tokens, spec, request_id, priority)

    def _add(self, tokens: list[int], spec: GenerationSpec, request_id: Optional[str] = None, priority: int = 0) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        params = spec.params(len(tokens))
        ids = [rid] + [f"{rid}__child#{i}" for i in range(params.num_return_sequences - 1)]
        used = [i for i in ids if i in self.requests]
        if used:
            raise ValueError(f"request_id {used[0]!r} is already in use")
        self._tp.on_add(rid, tokens, params, priority)
        req = Request(rid, len(tokens), tokens, params, arrival_step=self.num_steps, priority=priority)
        family = [req] + [Request(i, len(tokens), list(tokens), params, arrival_step=self.num_steps,
                                  arrival_time=req.arrival_time, priority=priority) for i in ids[1:]]
        for r in family:
            self.requests[r.request_id] = r
        problem = prompt_problem(tokens, params.max_new_tokens, vocab_size=self._vocab_size,
                                 max_positions=self._max_positions, can_ever_fit=self.cache.can_ever_fit)
        if problem is not None:
            for r in family:
                r.fail(problem)
                self._stats.record_request(r.to_output())
        elif len(family) > 1 and len(tokens) > 1:  # the siblings wait to adopt the prompt's blocks
            req.pending_children = family[1:]
            self.scheduler.add(req)
        else:
            for r in family:
                self.scheduler.add(r)
        self._changed.notify_all()
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is (waiting, prefilling, decoding) and free its blocks;
        a finished request is left as it is."""
        with self._lock:
            req = self._request(request_id)
            if not req.is_done:
                self._tp.on_cancel(request_id)
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
                    elif self._has_work():
                        self.step()
                    else:
                        break
                new = req.tokens[req.prompt_len + seen:]
                seen += len(new)
                done = req.is_done or not (self._has_work() or self._loop.runs_elsewhere())
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
        """1. schedule; 2. run (launch; with asynchronous scheduling the previous step's tokens
        are read back while this one runs, see ``cbkernels.engine.overlap``); 3. postprocess."""
        start = time.perf_counter()
        self.runner.reset_timing()
        self._tp.begin_step()  # rank 0 sends this step's new requests and cancellations
        self._switch.activate()
        batch = self.scheduler.schedule()
        scheduled = time.perf_counter()
        self.num_steps += 1
        for req in batch.failed:
            self._stats.record_request(req.to_output())
        for req in batch.started:  # a request's first step (a preempted one keeps its first)
            if req.first_scheduled_time is None and req in batch.members:
                req.first_scheduled_time, req.first_scheduled_step = start, self.num_steps - 1
        launched, error = None, None
        try:
            if batch.requests:
                launched = self.runner.launch(batch, on_device=self.config.async_scheduling)
        except BaseException as exc:  # noqa: BLE001 - handled after the step in flight is read back
            error, self.runner.previous = exc, None
        made = self._read_back(self._in_flight) if self._in_flight is not None else []
        self._in_flight = None
        ran = time.perf_counter()
        if launched is not None and launched.needs_host_sampling:
            try:  # sampled on the host now that the previous step's tokens are in the histories
                self.runner.sample_on_host(launched)
            except BaseException as exc:  # noqa: BLE001
                error = exc
        error = self._tp.agree(error)  # a fault on any rank fails this step on every rank
        if error is not None:
            self._fail_requests(batch.requests, f"step failed: {type(error).__name__}: {error}")
            if not isinstance(error, Exception):
                raise error
        elif launched is not None:
            self.scheduler.commit(batch, launched.sampling_flags())
            if launched.tokens is not None:  # tokens still on the device: read back next step
                self._in_flight = launched
                self._stats.async_steps += 1
            else:
                made += self._read_back(launched)
        self.last_step_timing = {"schedule": scheduled - start, **self.runner.timing,
                                 "postprocess": time.perf_counter() - ran}
        device_s = self.runner.timing["forward"] + self.runner.timing["device_wait"]  # the rest is host work
        self._stats.record_step(batch.num_tokens, len(made), len(batch.preempted), time.perf_counter() - start,
                                self.cache.num_used_blocks(), device_s)
        self.scheduler.observe_step(batch, time.perf_counter() - start)  # the step-time model (target_itl_ms)
        if not self._has_work():
            self._switch.restore()
        return made

    def _has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def _read_back(self, step) -> list[tuple[str, int]]:
        """The tokens of a launched step (waiting for them), applied: states, stops, metrics."""
        made: list[tuple[str, int]] = []
        sampled = step.sampled()
        self.runner.timing["device_wait"] += step.wait_s
        for req in self.scheduler.resolve(step.batch, sampled, time.perf_counter(), made):
            self._stats.record_request(req.to_output())
        return made

    def _fail_requests(self, reqs, reason: str) -> None:
        """Fail every live request of ``reqs`` with ``reason`` and free its blocks."""
        for req in reqs:
            if not req.is_done:
                self.scheduler.fail(req, reason)
                self._stats.record_request(req.to_output())

    def generate(self, inputs: Sequence[Sequence[int]], generation_config=None, *, progress_bar: bool = False,
                 return_logprobs: Optional[bool] = None, top_logprobs: int = 0, tokenizer=None) -> list[RequestOutput]:
        """Generate for every prompt (lists of token ids); outputs in input order.

        Misuse of the call (``inputs`` not a list of int lists, a bad ``generation_config``)
        raises TypeError/ValueError before anything is queued. Problems of single prompts
        and faults during a step do not raise: they land on that output's ``.error``. An
        interrupt (KeyboardInterrupt) fails and frees this call's requests, then propagates.
        ``progress_bar`` shows a tqdm bar of finished requests on stderr. With
        num_return_sequences = n the list holds n outputs per prompt, one prompt after the
        other."""
        prompts = check_inputs(inputs)
        spec = self._spec(generation_config, tokenizer, return_logprobs, top_logprobs)
        if not self._tp.is_driver:
            return self._tp.follow_generate(prompts, spec)  # rank 0's outputs of the same call
        with self._lock:
            ids = [i for p in prompts for i in self._family_ids(self._add(p, spec))]
            self._tp.announce(ids)
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

    def _family_ids(self, request_id: str) -> list[str]:
        n = self.requests[request_id].params.num_return_sequences
        return [request_id] + [f"{request_id}__child#{i}" for i in range(n - 1)]

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
                elif self._has_work():
                    self.step()
                else:  # cannot happen for live requests; never spin
                    raise RuntimeError("engine has live requests but no scheduled work")

    def metrics(self) -> dict:
        with self._lock:
            snapshot = self._stats.snapshot(active=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                                            cache=self.cache)
            snapshot.update(self.runner.graph_stats())
            snapshot.update(self.scheduler.metrics())
            size = self.cache.size
            snapshot.update(cache_tokens=size.tokens, cache_gib=size.bytes / float(1 << 30), cache_sizing=size.how,
                            max_num_seqs=self.config.max_num_seqs, cpu_malloc=self.cpu_malloc)
            return snapshot


def generate_batch(model, inputs, generation_config=None, continuous_batching_config=None, *,
                   config: Optional[BatchConfig] = None, progress_bar: bool = False, tokenizer=None,
                   return_logprobs: Optional[bool] = None, top_logprobs: int = 0) -> list[RequestOutput]:
    """One-shot ``Engine(model, config).generate(inputs, generation_config)``.

    The configuration is ``config`` or ``continuous_batching_config`` (a BatchConfig or
    transformers' ContinuousBatchingConfig; not both), else the continuous-batching settings
    the generation config carries (deprecated routes, warned), else the defaults
    (``hf_config.choose_config``)."""
    chosen = choose_config(model, config, continuous_batching_config, generation_config)
    return Engine(model, chosen, tokenizer=tokenizer).generate(
        inputs, generation_config, progress_bar=progress_bar, return_logprobs=return_logprobs, top_logprobs=top_logprobs)

"""The engine behind ``cbkernels.enable(model)``: transformers' ``ContinuousBatchingManager``
interface on a cbkernels ``Engine``, and its results as transformers' ``GenerationOutput``.

A background thread steps the engine while there is work and, after every step, hands
over new tokens of streaming requests and every finished request through an output queue
(``get_result`` / ``request_id_iter``), as transformers' manager does. ``stop()`` finishes
the queued requests first (``hard_stop=True`` fails them), ``pause()`` holds the loop
between two steps, and ``max_queue_size`` makes ``add_request`` wait up to 10 s for room
before it raises ``queue.Full``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
import time
import warnings
from collections import deque
from typing import Optional

from transformers.generation.continuous_batching.requests import GenerationOutput
from transformers.generation.continuous_batching.requests import RequestStatus as HF

from .engine.engine import Engine
from .engine.requests import RequestStatus

_CACHED = "_cbkernels_cached_manager"  # where a persistent manager stays, on the model
QUEUE_WAIT_S = 10.0  # how long add_request waits for room under max_queue_size (transformers' put timeout)
IDLE_WAIT_S = 0.1


@dataclasses.dataclass
class CBKernelsGenerationOutput(GenerationOutput):
    """transformers' GenerationOutput plus cbkernels' own fields."""

    finish_reason: Optional[str] = None
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list = dataclasses.field(default_factory=list)
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    top_logprobs: Optional[list] = None


def to_generation_output(out, record_timestamps: bool = True) -> CBKernelsGenerationOutput:
    """A cbkernels ``RequestOutput`` as transformers' ``GenerationOutput``."""
    status = {RequestStatus.PENDING: HF.PENDING, RequestStatus.DECODING: HF.DECODING,
              RequestStatus.FINISHED: HF.FINISHED, RequestStatus.FAILED: HF.FAILED}.get(out.status, HF.PREFILLING)
    return CBKernelsGenerationOutput(request_id=out.request_id, prompt_ids=out.prompt_ids, generated_tokens=out.generated_tokens,
                   logprobs=out.logprobs, error=out.error, status=status, created_time=out.created_time,
                   lifespan=out.lifespan, timestamps=out.timestamps if record_timestamps else None,
                   finish_reason=out.finish_reason, ttft_s=out.ttft_s, e2e_s=out.e2e_s, itl_s=out.itl_s,
                   num_preemptions=out.num_preemptions, prefix_hit_tokens=out.prefix_hit_tokens,
                   top_logprobs=out.top_logprobs)


class ContinuousBatchingManager:
    """transformers' ``ContinuousBatchingManager`` on a cbkernels ``Engine``: a background
    thread steps the engine and hands results over through an output queue."""

    def __init__(self, model, generation_config=None, continuous_batching_config=None, *, tokenizer=None):
        self.model = model
        self.generation_config = generation_config if generation_config is not None else model.generation_config
        self.engine = Engine(model, continuous_batching_config, tokenizer=tokenizer)
        self.continuous_batching_config = continuous_batching_config
        self.num_return_sequences = self.generation_config.num_return_sequences or 1
        self.warmed_up = False
        self.error: Optional[BaseException] = None
        self._counter = 0
        self._tracked: dict[str, list] = {}  # request id -> [streaming, record_timestamps, tokens sent]
        self._outputs: deque = deque()
        self._cond = threading.Condition()  # guards _tracked, _outputs, _stop, _pauses, _stepping
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stop: Optional[str] = None  # None, "flush" or "hard"
        self._pauses, self._stepping = 0, False
        self._local = threading.local()  # pauses held by the calling thread
        self.families: dict[str, list[str]] = {}  # request id -> it and its num_return_sequences siblings

    # ------------------------------------------------------------ requests
    def _request_config(self, max_new_tokens, eos_token_id, kwargs):
        options = self.engine.options
        if kwargs and not options.per_request_processors:
            raise ValueError(f"logit_processor_kwargs {sorted(kwargs)} need per_request_processors=True in the "
                             "continuous_batching_config")
        gc = copy.deepcopy(self.generation_config)
        for key, value in kwargs.items():
            if not hasattr(gc, key):
                raise ValueError(f"unknown logit_processor_kwargs {key!r}: not a GenerationConfig field")
            setattr(gc, key, value)
        if max_new_tokens is not None:
            gc.max_new_tokens = max_new_tokens
        if eos_token_id is not None:
            gc.eos_token_id = eos_token_id
        return gc

    def add_request(self, input_ids, request_id: Optional[str] = None, max_new_tokens: Optional[int] = None,
                    streaming: bool = False, record_timestamps: bool = False, eos_token_id=None,
                    **logit_processor_kwargs) -> Optional[str]:
        """Queue one prompt; returns its id, or None (with a warning) once the manager stops."""
        with self._cond:
            if self._stop is not None or self.error is not None:
                warnings.warn("the manager is stopping: the request is dropped", RuntimeWarning, stacklevel=2)
                return None
            if request_id is None:
                request_id, self._counter = f"req_{self._counter}", self._counter + 1
        gc = self._request_config(max_new_tokens, eos_token_id, logit_processor_kwargs)
        deadline = time.monotonic() + QUEUE_WAIT_S
        while True:
            try:
                rid = self.engine.add_request(list(input_ids), gc, request_id=request_id)
                break
            except queue.Full:  # max_queue_size: wait for the loop to admit some
                if not self.is_running() or time.monotonic() > deadline:
                    raise
                time.sleep(IDLE_WAIT_S)
        family = self.engine.sequence_ids(rid)  # not tracked yet, so not handed over yet either
        with self._cond:
            self.families[rid] = family
            for sid in family:
                self._tracked[sid] = [streaming, record_timestamps, 0]
        self._wake.set()
        return rid

    def add_requests(self, inputs, max_new_tokens: Optional[int] = None, streaming: bool = False,
                     record_timestamps: bool = False, **logit_processor_kwargs) -> list[str]:
        return [self.add_request(ids, max_new_tokens=max_new_tokens, streaming=streaming,
                                 record_timestamps=record_timestamps, **logit_processor_kwargs) for ids in inputs]

    def cancel_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; an unknown or finished id is a no-op."""
        try:
            self.engine.cancel(request_id)
        except KeyError:
            return
        self._wake.set()

    # ------------------------------------------------------------ results
    def get_result(self, request_id: Optional[str] = None, timeout: Optional[float] = None):
        """The next output (of ``request_id`` when given), waiting up to ``timeout`` seconds;
        None if none came or the manager is not running and has nothing left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for i, out in enumerate(self._outputs):
                    if request_id is None or out.request_id == request_id:
                        del self._outputs[i]
                        return out
                if not self.is_running():
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(IDLE_WAIT_S if left is None else min(left, IDLE_WAIT_S))

    def __iter__(self):
        while self.is_running() or self._outputs:
            out = self.get_result(timeout=IDLE_WAIT_S)
            if out is not None:
                yield out

    def request_id_iter(self, request_id: str):
        """Outputs of one request as they come (each token when streaming), until it ends."""
        while self.is_running() or any(o.request_id == request_id for o in list(self._outputs)):
            out = self.get_result(request_id=request_id, timeout=IDLE_WAIT_S)
            if out is not None:
                yield out
                if out.is_finished():
                    return

    def _deliver(self) -> None:
        """Hand over new tokens of streaming requests and every finished request."""
        with self._cond:
            tracked = list(self._tracked.items())
        found = []
        for rid, (streaming, stamps, sent) in tracked:
            req = self.engine.requests.get(rid)
            if req is None:
                continue
            if req.is_done:
                found.append((rid, to_generation_output(self.engine.pop_result(rid), stamps)))
            elif streaming and len(req.tokens) - req.prompt_len > sent:
                out = to_generation_output(self.engine.get_result(rid), stamps)
                found.append((rid, out))
        if found:
            with self._cond:
                for rid, out in found:
                    if out.is_finished():
                        self._tracked.pop(rid, None)
                    else:
                        self._tracked[rid][2] = len(out.generated_tokens)
                    self._outputs.append(out)
                self._cond.notify_all()

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop == "hard":
                        break
                    while self._pauses:
                        self._cond.wait()
                    self._stepping = True
                try:
                    busy = self.engine.scheduler.has_work()
                    if busy:
                        self.engine.step()
                finally:
                    with self._cond:
                        self._stepping = False
                        self._cond.notify_all()
                self._deliver()
                if not busy:
                    if self._stop == "flush":
                        break
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - kept for the caller, requests failed below
            self.error = exc
        finally:
            with self._cond:
                tracked = list(self._tracked)
            with self.engine._lock:  # a hard stop or a crash: what is still running fails
                live = [self.engine.requests[r] for r in tracked if r in self.engine.requests]
                self.engine._fail_requests(live, "generation loop stopped before the request finished")
            self._deliver()
            self.engine.stop()  # restores the model's attention implementation

    def start(self) -> None:
        if self.is_running():
            warnings.warn("the manager is already running", RuntimeWarning, stacklevel=2)
            return
        with self._cond:
            self._stop, self.error = None, None
        self._thread = threading.Thread(target=self._run, name="cbkernels-hf-manager", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def warmup(self) -> None:
        """Nothing to pre-capture: decode CUDA graphs are captured on first use."""
        self.warmed_up = True

    def stop(self, block: bool = True, timeout: Optional[float] = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        """Finish the queued requests and stop (``hard_stop``: fail them instead)."""
        with self._cond:
            if getattr(self._local, "pauses", 0):
                raise RuntimeError("cannot stop the manager from inside pause(): leave it first")
            self._stop = "hard" if hard_stop else (self._stop or "flush")
        self._wake.set()
        if block:
            self.join(timeout)
        if keep_for_next_session:
            setattr(self.model, _CACHED, self)

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def destroy(self) -> None:
        if self.is_running():
            self.stop(block=True)

    @contextlib.contextmanager
    def pause(self):
        """Hold the loop between two steps (the caller may use the model meanwhile)."""
        if not self.is_running():
            raise RuntimeError("cannot pause: the manager is not running")
        with self._cond:
            self._pauses += 1
            while self._stepping:
                self._cond.wait()
        self._local.pauses = getattr(self._local, "pauses", 0) + 1
        try:
            yield
        finally:
            self._local.pauses -= 1
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()



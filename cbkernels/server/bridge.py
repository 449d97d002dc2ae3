"""Between the event loop and the engine.

The engine's steps run in one thread of the server's own (``stepper.Stepper``), which also
makes every engine call (``add_request``, ``cancel``, ``pop_result``) between two steps: no
other thread waits for the engine's lock, so a step's tokens are handed out as soon as it
ends. After each step the stepper sends everything it made (tokens with their
log-probabilities, finished outputs) to the event loop in one ``call_soon_threadsafe``; the
event loop then puts each request group's events on its ``asyncio.Queue``.

Admission: at most ``max_num_seqs + max_waiting`` sequences are in flight; beyond that a
request is refused with 429 before anything is queued in the engine. A request with a
``seed`` and sampling runs on a private engine seeded with it (same model, its own small
cache and its own stepper), so its output does not depend on what else the server is doing.
"""
from __future__ import annotations

import asyncio
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from .errors import APIError, bad_request
from .stepper import Event, Stepper, Track

SEEDED_ENGINES = 2  # private engines (seeded sampling) running at once; more wait their turn
HANDOFF_WAIT_S = 0.05  # longest a step's output holds back the next step (see EngineBridge._post_step)


@dataclass(frozen=True)
class LogprobRequest:
    """What the engine is asked to return per generated token."""
    top: int = 0  # alternatives per token


class Group:
    """The engine requests of one HTTP request (one per choice), seen from the event loop."""

    def __init__(self, bridge: "EngineBridge", stepper: Optional[Stepper], n: int, owns_stepper: bool):
        self.bridge, self.stepper, self.owns_stepper = bridge, stepper, owns_stepper
        prefix = uuid.uuid4().hex[:12]
        self.request_ids = [f"srv-{prefix}-{i}" for i in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reported = [False] * n  # final event seen by the handler
        self.closed = False

    # ------------------------------------------------------------ event-loop side
    async def next_events(self) -> list[Event]:
        """The next events (at least one), everything already queued included."""
        events = [await self.queue.get()]
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        for ev in events:
            if ev.output is not None or ev.error is not None:
                self.reported[ev.index] = True
        return events

    def cancel_choice(self, index: int) -> None:
        """Stop one choice early (a stop string matched); its blocks are freed before the next step."""
        if not self.reported[index]:
            self.reported[index] = True
            if self.stepper is not None:
                self.stepper.cancel([self.request_ids[index]])

    def cancel_all(self) -> None:
        """Cancel every unfinished choice; their (cancelled) outputs still arrive."""
        pending = [rid for rid, done in zip(self.request_ids, self.reported) if not done]
        if pending and self.stepper is not None:
            self.stepper.cancel(pending)

    def close(self) -> None:
        """The handler is done (finished, failed or its client left): cancel what still
        runs and give the admission slots back. Synchronous and idempotent, so it is safe in
        a ``finally`` of a cancelled task."""
        if self.closed:
            return
        self.closed = True
        self.bridge._release(self)
        self.cancel_all()
        if self.owns_stepper and self.stepper is not None:
            self.stepper.stop_when_idle()

    def deliver(self, event: Event) -> None:
        if not self.closed or event.output is not None or event.error is not None:
            self.queue.put_nowait(event)


class EngineBridge:
    def __init__(self, engine, *, max_waiting: int, metrics=None, model=None):
        self.engine = engine
        self.model = model if model is not None else engine.model
        self.metrics = metrics
        self.capacity = engine.config.max_num_seqs + max_waiting
        self.in_flight = 0  # sequences admitted and not yet closed (event-loop thread only)
        self.closing = False
        self.groups: set[Group] = set()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stepper = Stepper(engine, self._post_step, name="cbkernels-engine")
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cbkernels-control")
        self._seeded: Optional[asyncio.Semaphore] = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._seeded = asyncio.Semaphore(SEEDED_ENGINES)
        self.stepper.start()

    @property
    def error(self) -> Optional[BaseException]:
        """What ended the serving thread, if anything did."""
        return self.stepper.error

    # ------------------------------------------------------------ stepper -> event loop
    def _post_step(self, batch: list) -> None:
        """From the stepping thread: one step's events, ``[(track, Event), ...]``, in one hop.
        It returns once the event loop has handed them to the handlers and they have written
        their chunks (or after HANDOFF_WAIT_S): on a machine with no spare core, handlers
        working beside the next step's forward would take that forward's CPU and the GIL
        from it, which costs the step more than this short wait."""
        if self.metrics is not None:
            for _track, ev in batch:
                if ev.output is not None:
                    self.metrics.observe_output(ev.output)
        handed = threading.Event()
        try:
            self.loop.call_soon_threadsafe(_deliver_all, self.loop, batch, handed)
        except RuntimeError:  # the event loop is closed: the server has gone away
            return
        handed.wait(HANDOFF_WAIT_S)

    async def run(self, fn, *args):
        """Run a blocking call on the control pool and wait for it without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------ admission
    def _admit(self, n: int) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if n > self.capacity:  # could never be admitted: retrying would not help
            raise APIError(400, f"the request needs {n} sequences (n x prompts); this server runs at most "
                                f"{self.capacity} at once", param="n")
        if self.in_flight + n > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.in_flight} sequences in flight, limit "
                                f"{self.capacity}); retry later", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.in_flight += n

    def _release(self, group: Group) -> None:
        if group in self.groups:
            self.groups.discard(group)
            self.in_flight -= len(group.request_ids)
            if group.owns_stepper:
                self._seeded.release()

    async def submit(self, prompts: list[list[int]], generation_config, *, seed: Optional[int] = None,
                     logprobs: Optional[LogprobRequest] = None) -> Group:
        """Queue one engine request per prompt (choices repeat their prompt); 429 when full."""
        tp = self.engine.cache.tp
        if seed is not None and tp is not None and tp.is_parallel:
            # A seeded request samples on a private engine, which every rank would have to build.
            raise bad_request(f"seed is not supported by a tensor-parallel server (--tp {tp.size}): "
                              "leave it out, or serve without --tp", param="seed")
        self._admit(len(prompts))
        stepper, owns = self.stepper, False
        if seed is not None:
            try:
                await self._seeded.acquire()
            except BaseException:
                self.in_flight -= len(prompts)
                raise
            owns = True
        group = Group(self, None if owns else stepper, len(prompts), owns)
        self.groups.add(group)
        try:
            if owns:
                engine = await self.run(self._private_engine, prompts, generation_config, seed)
                group.stepper = Stepper(engine, self._post_step, name="cbkernels-seeded")
                group.stepper.start()
            kwargs = {} if logprobs is None else {"return_logprobs": True, "top_logprobs": logprobs.top}
            tracks = [Track(group, i, rid) for i, rid in enumerate(group.request_ids)]
            done = self.loop.create_future()
            group.stepper.add(tracks, prompts, generation_config, kwargs, self._resolver(done))
            await done
        except BaseException:
            group.close()
            raise
        return group

    def _resolver(self, future: asyncio.Future):
        """A callback for the stepping thread that settles ``future`` in the event loop."""
        def settle(error: Optional[BaseException]) -> None:
            def apply():
                if future.done():
                    return
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
            try:
                self.loop.call_soon_threadsafe(apply)
            except RuntimeError:
                pass
        return settle

    def _private_engine(self, prompts, generation_config, seed: int):
        """An engine of its own for seeded sampling, its cache sized to these requests."""
        from cbkernels import BatchConfig, Engine

        main = self.engine.config
        need = sum(math.ceil((len(p) + generation_config.max_new_tokens) / main.block_size) for p in prompts)
        num_blocks = min(need + 1, self.engine.cache.num_blocks)
        config = BatchConfig(num_blocks=num_blocks, block_size=main.block_size, max_batch_tokens=main.max_batch_tokens,
                             max_num_seqs=len(prompts), scheduler=main.scheduler, backend=main.backend,
                             device=main.device, prefix_caching=False, seed=seed % (1 << 64))
        return Engine(self.model, config)

    # ------------------------------------------------------------ shutdown
    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, give running ones ``timeout_s`` to finish, cancel the rest."""
        self.closing = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.groups and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for group in list(self.groups):
            group.cancel_all()

    def shutdown(self) -> None:
        """Stop the stepping thread (after the step it is running) and the control pool."""
        self.stepper.stop()
        self._pool.shutdown(wait=True)


def _deliver_all(loop, batch: list, handed: threading.Event) -> None:
    for track, event in batch:
        track.group.deliver(event)
    # Scheduled behind the handlers just woken: it runs once they have processed these events.
    loop.call_soon(handed.set)

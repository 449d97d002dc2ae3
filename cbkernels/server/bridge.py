"""Between the event loop and the engine.

The engine runs its own serving loop (``Engine.start()``); its calls take the engine's lock,
which a step holds for its whole forward, so the event loop never calls the engine itself:

* ``add_request`` / ``cancel`` / ``stop`` run on a small control thread pool;
* each engine request gets one pump thread that iterates ``engine.stream`` (it sleeps on the
  engine's condition variable, no polling) and hands every token to the event loop with
  ``loop.call_soon_threadsafe`` into the request group's ``asyncio.Queue``, then hands over
  the final ``RequestOutput`` (``pop_result``: the engine forgets it).

Admission: at most ``max_num_seqs + max_waiting`` sequences are in flight; beyond that a
request is refused with 429 before anything is tokenised into the engine. A request with a
``seed`` and sampling runs on a private engine seeded with it (same model, its own small
cache), so its output does not depend on what else the server is doing.
"""
from __future__ import annotations

import asyncio
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from .errors import APIError

SEEDED_ENGINES = 2  # private engines (seeded sampling) running at once; more wait their turn


@dataclass
class Event:
    index: int  # which choice
    token: Optional[int] = None
    output: object = None  # the RequestOutput, once the request is over
    error: Optional[BaseException] = None


class Group:
    """The engine requests of one HTTP request (one per choice), seen from the event loop."""

    def __init__(self, bridge: "EngineBridge", engine, n: int, owns_engine: bool):
        self.bridge, self.engine, self.owns_engine = bridge, engine, owns_engine
        prefix = uuid.uuid4().hex[:12]
        self.request_ids = [f"srv-{prefix}-{i}" for i in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reported = [False] * n  # final event seen by the handler
        self.closed = False
        self._lock = threading.Lock()  # orders close() against the thread adding the requests
        self._added = False
        self._live_pumps = n

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
        """Stop one choice early (a stop string matched); its blocks are freed at once."""
        if not self.reported[index]:
            self.reported[index] = True
            self.bridge.control(self._cancel, [self.request_ids[index]])

    def cancel_all(self) -> None:
        """Cancel every unfinished choice; the pumps still deliver their (cancelled) outputs."""
        pending = [rid for rid, done in zip(self.request_ids, self.reported) if not done]
        if pending:
            self.bridge.control(self._cancel, pending)

    def close(self) -> None:
        """The handler is done (finished, failed or its client left): cancel what still
        runs and give the admission slots back. Synchronous and idempotent, so it is safe in
        a ``finally`` of a cancelled task."""
        if self.closed:
            return
        self.closed = True
        self.bridge._release(self)
        with self._lock:
            added = self._added
        if added:
            self.cancel_all()
        # Not yet added: the adding thread sees ``closed`` and cancels what it added.

    # ------------------------------------------------------------ thread side
    def _cancel(self, request_ids) -> None:
        for rid in request_ids:
            try:
                self.engine.cancel(rid)
            except KeyError:  # already finished and handed over
                pass

    def _add_all(self, prompts, generation_config) -> bool:
        added = []
        try:
            for prompt, rid in zip(prompts, self.request_ids):
                self.engine.add_request(prompt, generation_config, request_id=rid)
                added.append(rid)
            if self.owns_engine:
                self.engine.start()
        finally:
            with self._lock:
                self._added = True
                closed = self.closed or len(added) < len(prompts)
            if closed:  # the client left while we were adding, or adding failed
                for rid in added:
                    self._cancel([rid])
                    self.engine.pop_result(rid)
                if self.owns_engine:
                    self.engine.stop()
        return not closed

    def _start_pumps(self) -> None:
        for index, rid in enumerate(self.request_ids):
            threading.Thread(target=self._pump, args=(index, rid), daemon=True,
                             name=f"cbkernels-pump-{rid}").start()

    def _pump(self, index: int, rid: str) -> None:
        post = self.bridge.post
        try:
            for token in self.engine.stream(rid):
                post(self.queue, Event(index, token=token))
            output = self.engine.pop_result(rid)
        except BaseException as exc:  # noqa: BLE001 - handed to the handler as this choice's failure
            post(self.queue, Event(index, error=exc))
        else:
            if self.bridge.metrics is not None:
                self.bridge.metrics.observe_output(output)
            post(self.queue, Event(index, output=output))
        finally:
            with self._lock:
                self._live_pumps -= 1
                last = self._live_pumps == 0
            if last and self.owns_engine:
                self.engine.stop()


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
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cbkernels-control")
        self._seeded: Optional[asyncio.Semaphore] = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._seeded = asyncio.Semaphore(SEEDED_ENGINES)

    def post(self, queue: asyncio.Queue, item) -> None:
        """From any thread: put ``item`` on ``queue`` in the event loop (dropped once it is closed)."""
        try:
            self.loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server has gone away
            pass

    def control(self, fn, *args):
        return self._pool.submit(fn, *args)

    async def run(self, fn, *args):
        """Run a blocking engine call on the control pool and wait for it without blocking the loop."""
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
            if group.owns_engine:
                self._seeded.release()

    async def submit(self, prompts: list[list[int]], generation_config, *, seed: Optional[int] = None) -> Group:
        """Queue one engine request per prompt (choices repeat their prompt); 429 when full."""
        self._admit(len(prompts))
        engine, owns = self.engine, False
        if seed is not None:
            try:
                await self._seeded.acquire()
            except BaseException:
                self.in_flight -= len(prompts)
                raise
            owns = True
        group = Group(self, engine, len(prompts), owns)
        self.groups.add(group)
        try:
            if owns:
                group.engine = await self.run(self._private_engine, prompts, generation_config, seed)
            if await self.run(group._add_all, prompts, generation_config):
                group._start_pumps()
        except BaseException:
            group.close()
            raise
        return group

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
        self._pool.shutdown(wait=True)

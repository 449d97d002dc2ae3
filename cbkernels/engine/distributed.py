"""Tensor parallelism: every rank of the group runs the same engine steps on the same requests.

A model loaded under ``torchrun`` with ``DistributedConfig(tp_size=N)`` holds 1/N of the
attention heads and MLP columns on each rank; its forward all-reduces over the model's
process group. ``Engine(model, config)`` then gives each rank a cache of its own KV heads
(``cache.for_model`` via ``tp_layout``; every rank the smallest auto-sized ``num_blocks``)
and a ``ControlPlane``, which keeps the ranks' schedulers identical:

* **Ingress is rank 0's.** ``add_request`` / ``cancel`` / ``stop`` happen there (a follower
  refuses them); each change is journalled, and at the start of every step rank 0 broadcasts
  the journal over a gloo group of its own (``CBKERNELS_TP_TIMEOUT_S``, default 300 s).
  The other ranks apply it in the same order, then run the same step: the scheduler is
  deterministic, so the schedules, block counts and preemptions agree.
  A message is a two-integer header (command, payload bytes) and, when something changed,
  the pickled journal: a decode step with no new request costs one 16-byte broadcast.
* **SPMD ``generate``**: every rank may call ``generate(prompts)``. Rank 0 runs it; a
  follower takes rank 0's requests of that call (announced in the journal), follows the
  steps until they are done and returns the same outputs.
* **Sampling is agreed**: the logits are gathered (the lm_head is column-parallel with
  gathered output), and every rank samples with one generator seeded from rank 0
  (``BatchConfig.seed``, else a random seed rank 0 draws).
* **Faults are agreed**: after each step the ranks all-reduce whether any of them failed;
  if one did, every rank fails the step's requests with the same text naming the rank and
  the error, frees their blocks, and goes on serving. An exception inside attention is held
  until the forward ends, so the model's collectives stay matched; a fault that stops a
  rank inside the model's own collectives is beyond recovery and ends at the model process
  group's timeout.

Followers serve through ``tp_loops.FollowerLoop`` (``engine.start()`` or ``engine.stop()``
follows until rank 0 stops). See docs/distributed.md.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import random
import time
from collections import deque
from datetime import timedelta
from typing import Callable, Optional

import torch

from . import tp_cuda, tp_follower
from .tp_follower import EVENTS, STEP, STOP, STOP_STRINGS_NEED_TOKENIZERS
from .tp_layout import TPLayout
from .tp_loops import DriverLoop, FollowerLoop, Heartbeat

TIMEOUT_ENV = "CBKERNELS_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


class TensorParallelStepError(RuntimeError):
    """A step failed on some rank of a tensor-parallel group (the message names them)."""


def control_timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


class SingleRank:
    """The control plane of an engine that is not tensor parallel: every hook does nothing."""

    is_driver = True

    def on_add(self, request_id: str, tokens: list[int], params, priority: int = 0) -> None:
        pass

    def on_cancel(self, request_id: str) -> None:
        pass

    def announce(self, ids: list[str]) -> None:
        pass

    def begin_step(self) -> None:
        pass

    def agree(self, error: Optional[BaseException]) -> Optional[BaseException]:
        return error


_SINGLE = SingleRank()


def is_rank0(engine) -> bool:
    """True unless ``engine`` is a tensor-parallel engine on a rank other than 0."""
    return engine._tp.is_driver


def attach(engine):
    """The engine's control plane: a ``ControlPlane`` when its model is tensor parallel."""
    tp = engine.cache.tp
    return ControlPlane(engine, tp) if tp is not None and tp.is_parallel else _SINGLE


def _stop_strings_of(check) -> Optional[tuple]:
    """The stop strings a ``GenerationSpec`` stop check was built from (the transformers
    criteria it closes over keeps them), or None."""
    for cell in getattr(check, "__closure__", None) or ():
        strings = getattr(cell.cell_contents, "stop_strings", None)
        if isinstance(strings, (list, tuple)) and all(isinstance(x, str) for x in strings):
            return tuple(strings)
    return None


class ControlPlane:
    def __init__(self, engine, layout: TPLayout):
        import torch.distributed as dist

        previous = getattr(engine.model, "_cbkernels_control_plane", None)
        if previous is not None and not previous.stopped:
            raise RuntimeError("this tensor-parallel model's engine is still live: every rank would have to build "
                               "the new engine together (call engine.stop() on every rank first); a second engine "
                               "on one rank only (e.g. the server's private engine of a seeded request) cannot "
                               "run with tensor parallelism")
        self._dist = dist
        self.engine, self.layout = engine, layout
        self.is_driver = layout.rank == 0
        ranks = dist.get_process_group_ranks(layout.group)
        self.root = ranks[0]
        self.group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=control_timeout_s()),
                                    use_local_synchronization=len(ranks) < dist.get_world_size())
        self.journal: list[tuple] = []  # rank 0: changes since the last message
        self.calls: deque[list[str]] = deque()  # followers: ids of rank 0's generate calls, oldest first
        self.awaited: set[str] = set()  # followers: ids a generate call will collect
        self.following = self.applying = self.stopped = False
        self.deferred: Optional[BaseException] = None  # an exception held until the forward ends
        self.last_send = time.monotonic()
        self.stats = {"messages": 0, "payload_bytes": 0, "send_s": 0.0, "agree_s": 0.0}
        self._header = torch.zeros(2, dtype=torch.int64)
        self._flag = torch.zeros(1, dtype=torch.int64)
        # Stop strings travel as strings; each follower rebuilds the check with its tokenizer.
        has_tokenizer: list = [None] * layout.size
        dist.all_gather_object(has_tokenizer, engine.tokenizer is not None, group=self.group)
        self.stop_strings_ok = all(has_tokenizer[1:])
        self.stop_checks: dict = {}  # followers: the checks built per set of stop strings
        seed = engine.config.seed if engine.config.seed is not None else random.getrandbits(62)
        self._header[0] = seed
        dist.broadcast(self._header, src=self.root, group=self.group)
        engine.generator = engine.runner.generator = torch.Generator(device=engine.cache.kv.device).manual_seed(
            int(self._header[0]))
        self._guard_attention(engine.attention)
        self._observe, self._observed_batch = engine.scheduler.observe_step, None
        engine.scheduler.observe_step = self._observe_step
        engine._loop = (DriverLoop if self.is_driver else FollowerLoop)(engine, self)
        engine.model._cbkernels_control_plane = self
        self.heartbeat: Optional[Heartbeat] = None
        self._beat()
        tp_cuda.prepare(engine.runner)  # CUDA graphs holding NCCL collectives (GPU only)

    # ------------------------------------------------------------------ rank 0: ingress
    def _refuse(self, what: str) -> None:
        raise RuntimeError(f"{what} on tensor-parallel rank {self.layout.rank}: requests enter on rank 0 only "
                           "(the other ranks call engine.start() / engine.stop(), or the same generate())")

    def on_add(self, request_id: str, tokens: list[int], params, priority: int = 0) -> None:
        """Engine._add, before it changes anything: journalled on rank 0, refused elsewhere
        unless the follower is replaying rank 0's journal."""
        if not self.is_driver:
            if not self.applying:
                self._refuse("add_request")
            return
        stop = None
        if params.stop_check is not None:
            stop = _stop_strings_of(params.stop_check)
            if stop is None or not self.stop_strings_ok:
                raise ValueError(STOP_STRINGS_NEED_TOKENIZERS)
            params = dataclasses.replace(params, stop_check=None)
        self.journal.append(("add", request_id, list(tokens), params, priority, stop))

    def on_cancel(self, request_id: str) -> None:
        if not self.is_driver:
            self._refuse("cancel")
        self.journal.append(("cancel", request_id))

    def announce(self, ids: list[str]) -> None:
        """Rank 0's generate call queued ``ids``: followers running the same call collect them.
        Sent at once unless a serving loop will send it with its next step."""
        if self.is_driver:
            self.journal.append(("call", list(ids)))
            if not self.engine._loop.runs_elsewhere():
                self.send_events()

    # ------------------------------------------------------------------ messages
    def _beat(self) -> None:
        """Rank 0: a heartbeat thread while the followers follow."""
        if self.is_driver and not self.stopped and (self.heartbeat is None or not self.heartbeat.is_alive()):
            self.heartbeat = Heartbeat(self.send_events, lambda: time.monotonic() - self.last_send,
                                       lambda: self.stopped, self.engine._changed)

    def _send(self, command: int) -> None:
        events, self.journal = self.journal, []
        payload = pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL) if events else b""
        start = time.perf_counter()
        self._header[0], self._header[1] = command, len(payload)
        self._dist.broadcast(self._header, src=self.root, group=self.group)
        if payload:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            self._dist.broadcast(data, src=self.root, group=self.group)
        self.stats["send_s"] += time.perf_counter() - start
        self.stats["messages"] += 1
        self.stats["payload_bytes"] += len(payload)
        self.last_send = time.monotonic()
        self.stopped = command == STOP
        self._beat()

    def send_events(self) -> None:
        self._send(EVENTS)

    def send_stop(self, quiet: bool = False) -> None:
        """Tell the followers to stop following (once); ``quiet``: a broken group is ignored."""
        if self.stopped:
            return
        try:
            self._send(STOP)
        except Exception:  # noqa: BLE001 - the loop is ending anyway; a dead peer cannot be told
            if not quiet:
                raise
            self.stopped = True

    def receive(self) -> tuple[int, list]:
        """A follower's next message from rank 0: (command, events)."""
        start = time.perf_counter()
        self._dist.broadcast(self._header, src=self.root, group=self.group)
        command, size = self._header.tolist()
        events = []
        if size:
            data = torch.empty(size, dtype=torch.uint8)
            self._dist.broadcast(data, src=self.root, group=self.group)
            events = pickle.loads(data.numpy().tobytes())
        self.stats["send_s"] += time.perf_counter() - start
        self.stats["messages"] += 1
        self.stats["payload_bytes"] += size
        self.stopped = command == STOP
        return command, events

    # ------------------------------------------------------------------ steps
    def begin_step(self) -> None:
        """Start of every step: rank 0 sends the journal and the step; a follower only steps
        when rank 0's message says so."""
        if self.is_driver:
            self._send(STEP)
        elif not self.following:
            raise RuntimeError(f"step() on tensor-parallel rank {self.layout.rank}: rank 0 drives the steps "
                               "(call engine.start(), engine.stop() or the same generate() here)")

    def agree(self, error: Optional[BaseException]) -> Optional[BaseException]:
        """After a step's run: whether any rank failed, agreed by every rank. Returns the error
        the engine fails the step's requests with (the same text on every rank), or None."""
        start = time.perf_counter()
        local = self.deferred if self.deferred is not None else error
        self.deferred = None
        self._flag[0] = local is not None
        self._dist.all_reduce(self._flag, op=self._dist.ReduceOp.MAX, group=self.group)
        if not self._flag[0]:
            self.stats["agree_s"] += time.perf_counter() - start
            return None
        texts: list = [None] * self.layout.size
        self._dist.all_gather_object(texts, None if local is None else f"{type(local).__name__}: {local}",
                                     group=self.group)
        self.engine.runner.previous = None  # nothing of this step feeds the next one
        self.stats["agree_s"] += time.perf_counter() - start
        if error is not None and not isinstance(error, Exception):
            return error  # an interrupt: failed here, then raised
        failed = "; ".join(f"rank {r}: {t}" for r, t in enumerate(texts) if t is not None)
        return TensorParallelStepError(f"failed on tensor-parallel {failed}")

    def _observe_step(self, batch, seconds: float) -> None:
        """The scheduler's step-time model (``target_itl_ms``) learns from wall times, which
        differ between ranks: every rank feeds it rank 0's, before the next schedule."""
        if self.is_driver:
            self._observe(batch, seconds)
            if getattr(self.engine.scheduler, "step_budget", None) is not None and batch.requests:
                self.journal.append(("observe", seconds))
        else:
            self._observed_batch = batch

    def observe_rank0_time(self, seconds: float) -> None:
        """A follower: the last step's time, as rank 0 measured it, for the step-time model."""
        self._observe(self._observed_batch, seconds)

    def _guard_attention(self, backend) -> None:
        """Hold an exception raised inside attention until the forward ends (the remaining
        layers return zeros), so this rank still joins every collective of the forward."""
        attend = backend.attend
        plane = self

        def guarded(module, query, key, value, meta, **kwargs):
            if plane.deferred is None:
                try:
                    return attend(module, query, key, value, meta, **kwargs)
                except Exception as exc:  # noqa: BLE001 - agreed after the forward (agree)
                    plane.deferred = exc
            else:
                backend.layer_calls += 1
            return query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])

        backend.attend = guarded

    # ------------------------------------------------------------------ followers
    def follow(self, until: Optional[Callable[[], bool]] = None) -> None:
        tp_follower.follow(self, until)

    def follow_generate(self, prompts: list[list[int]], spec) -> list:
        return tp_follower.follow_generate(self, prompts, spec)

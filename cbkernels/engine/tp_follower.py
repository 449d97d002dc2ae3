"""What a tensor-parallel rank other than 0 does (``cbkernels.engine.distributed``): replay
rank 0's journal, run the steps it announces, and answer a ``generate`` call with rank 0's
outputs of the same call."""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Optional

STEP, EVENTS, STOP = 1, 2, 3  # message commands: run a step / apply the journal only / stop following
STOP_STRINGS_NEED_TOKENIZERS = ("stop_strings with tensor parallelism need the tokenizer on every rank: pass "
                                "Engine(model, config, tokenizer=...) on every rank")


class _Params:
    """``GenerationSpec``'s one method ``Engine._add`` uses, for requests rank 0 resolved."""

    def __init__(self, params):
        self._params = params

    def params(self, prompt_len: int):
        return self._params


def _stop_check(plane, strings: tuple):
    """The stop check for ``strings`` with this rank's tokenizer, built once per set of strings."""
    check = plane.stop_checks.get(strings)
    if check is None:
        from .hf_generation import _stop_check as build

        check = plane.stop_checks[strings] = build(plane.engine.tokenizer, list(strings))
    return check


def apply(plane, events: list) -> None:
    """Replay rank 0's journal on this rank's engine, in order (the caller holds its lock)."""
    eng, now = plane.engine, time.perf_counter()
    plane.applying = True
    try:
        for event in events:
            if event[0] == "add":
                _, rid, tokens, params, priority, stop = event
                if stop is not None:
                    params = dataclasses.replace(params, stop_check=_stop_check(plane, stop))
                eng._add(tokens, _Params(params), rid, priority)
            elif event[0] == "cancel":
                req = eng.requests.get(event[1])
                if req is not None and not req.is_done:
                    eng.scheduler.cancel(req, now)
            elif event[0] == "observe":  # rank 0's step time: the same step-time model here
                plane.observe_rank0_time(event[1])
            elif event[0] == "call":
                plane.calls.append(event[1])
                plane.awaited.update(event[1])
    finally:
        plane.applying = False


def follow(plane, until: Optional[Callable[[], bool]] = None) -> None:
    """Apply rank 0's messages and run the steps they announce until rank 0 stops (or
    ``until()`` holds: a follower's generate). Finished requests nobody collects are
    forgotten after each message."""
    eng = plane.engine
    plane.following = True
    try:
        while until is None or not until():
            command, events = plane.receive()
            with eng._changed:
                apply(plane, events)
                if command == STEP:
                    eng.step()
                for rid in [r for r, q in eng.requests.items() if q.is_done and r not in plane.awaited]:
                    del eng.requests[rid]
                eng._changed.notify_all()
            if command == STOP:
                if until is not None:
                    raise RuntimeError("rank 0 stopped the tensor-parallel group before its generate call "
                                       "reached this rank")
                return
    finally:
        plane.following = False


def follow_generate(plane, prompts: list[list[int]], spec) -> list:
    """A follower's ``generate(prompts)``: rank 0's outputs of the same call."""
    eng = plane.engine
    if spec.config.stop_strings and not plane.stop_strings_ok:
        raise ValueError(STOP_STRINGS_NEED_TOKENIZERS)  # as rank 0 raises for the same call

    def ready() -> bool:
        return bool(plane.calls) and all(eng.requests[i].is_done for i in plane.calls[0])

    if eng._loop.runs_elsewhere():
        with eng._changed:
            while not ready():
                if not eng._loop.is_alive():
                    raise RuntimeError("the follower loop ended before rank 0's generate call finished") \
                        from eng._loop.error
                eng._changed.wait(1.0)
    else:
        follow(plane, until=ready)
    with eng._changed:
        ids = plane.calls.popleft()
        plane.awaited.difference_update(ids)
        outputs = [eng.pop_result(i) for i in ids]
    firsts = [o.prompt_ids for o in outputs if "__child#" not in o.request_id]
    if [list(p) for p in firsts] != [list(p) for p in prompts]:
        warnings.warn(f"generate on tensor-parallel rank {plane.layout.rank} was given other prompts than rank 0: "
                      "it returns rank 0's outputs", RuntimeWarning, stacklevel=3)
    return outputs

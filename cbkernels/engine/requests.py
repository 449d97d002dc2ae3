"""Requests: the state machine of one generation, and what the caller gets back."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class RequestStatus(str, Enum):
    PENDING = "pending"
    PREFILLING = "prefilling"  # the whole remaining prompt runs in this step
    PREFILLING_SPLIT = "prefilling_split"  # one chunk of a prompt too long for the step budget
    SPLIT_PENDING_REMAINDER = "split_pending_remainder"  # between two chunks
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"


S = RequestStatus
_TERMINAL = {S.FINISHED, S.FAILED}
# Preemption (back to PENDING) is legal from every state that holds cache blocks;
# FINISHED from every live state covers cancellation and a first token that ends the request.
ALLOWED_TRANSITIONS: dict[RequestStatus, frozenset] = {
    S.PENDING: frozenset({S.PREFILLING, S.PREFILLING_SPLIT, S.FINISHED, S.FAILED}),
    S.PREFILLING: frozenset({S.DECODING, S.PENDING, S.FINISHED, S.FAILED}),
    S.PREFILLING_SPLIT: frozenset({S.SPLIT_PENDING_REMAINDER, S.DECODING, S.PENDING, S.FINISHED, S.FAILED}),
    S.SPLIT_PENDING_REMAINDER: frozenset({S.PREFILLING_SPLIT, S.PENDING, S.FINISHED, S.FAILED}),
    S.DECODING: frozenset({S.DECODING, S.PENDING, S.FINISHED, S.FAILED}),
    S.FINISHED: frozenset(),
    S.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_generation_config(cls, gc) -> "SamplingParams":
        eos = gc.eos_token_id
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else 20
        return cls(
            max_new_tokens=int(max_new), eos_token_ids=eos, do_sample=bool(gc.do_sample),
            temperature=float(gc.temperature if gc.temperature is not None else 1.0),
            top_k=int(gc.top_k or 0), top_p=float(gc.top_p if gc.top_p is not None else 1.0),
        )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass(slots=True, eq=False)
class Request:
    """One generation. ``tokens`` is prompt + generated; the first ``num_computed`` of them
    have K/V in the cache, so the next step feeds ``tokens[num_computed:]`` (one token while
    decoding). Preemption drops the cache and recomputes prompt + generated later.
    Requests compare by identity (``eq=False``): queues test membership without comparing
    token lists, and a request can key a dict."""

    request_id: str
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    status: RequestStatus = S.PENDING
    num_computed: int = 0
    error: Optional[str] = None
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    arrival_step: int = 0  # engine steps run before the request arrived
    first_scheduled_time: Optional[float] = None  # first step that ran any of its tokens
    first_scheduled_step: Optional[int] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    token_times: list[float] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    prefix_hit_tokens: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (>= 1 for a live request)."""
        return len(self.tokens) - self.num_computed

    @property
    def is_done(self) -> bool:
        return self.status in _TERMINAL

    def transition(self, new: RequestStatus) -> None:
        if new not in ALLOWED_TRANSITIONS[self.status]:
            raise IllegalTransition(f"request {self.request_id}: illegal transition {self.status.name} -> {new.name}")
        self.status = new

    def fail(self, reason: str) -> None:
        self.transition(S.FAILED)
        self.error = reason
        self.finish_reason = "error"
        self.finish_time = time.perf_counter()

    def append_token(self, token: int, now: float) -> None:
        self.tokens.append(token)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def stop_reason(self) -> Optional[str]:
        gen = len(self.tokens) - self.prompt_len
        if gen and self.tokens[-1] in self.params.eos_token_ids:
            return "eos"
        if gen >= self.params.max_new_tokens:
            return "length"
        return None

    def to_output(self) -> "RequestOutput":
        itl = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival_time
        e2e = None if self.finish_time is None else self.finish_time - self.arrival_time
        return RequestOutput(
            request_id=self.request_id, prompt_ids=self.tokens[:self.prompt_len],
            generated_tokens=list(self.generated), status=self.status, error=self.error,
            finish_reason=self.finish_reason, ttft_s=ttft, itl_s=itl, e2e_s=e2e,
            num_preemptions=self.num_preemptions, prefix_hit_tokens=self.prefix_hit_tokens,
        )


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    generated_tokens: list[int]
    status: RequestStatus
    error: Optional[str] = None
    finish_reason: Optional[str] = None
    ttft_s: Optional[float] = None  # time to first token
    itl_s: list[float] = field(default_factory=list)  # inter-token latencies
    e2e_s: Optional[float] = None  # arrival to finish
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0

    @property
    def mean_itl_s(self) -> Optional[float]:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None

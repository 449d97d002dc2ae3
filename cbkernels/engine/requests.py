"""Requests: the state machine of one generation, and what the caller gets back."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional


class RequestStatus(str, Enum):
    PENDING = "pending"
    PREFILLING = "prefilling"  # the whole remaining prompt runs in this step
    PREFILLING_SPLIT = "prefilling_split"  # one chunk of a prompt too long for the step budget
    SPLIT_PENDING_REMAINDER = "split_pending_remainder"  # between two chunks
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"


S = RequestStatus
TERMINAL = frozenset({S.FINISHED, S.FAILED})  # no way out of these
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
    """What one request asks of the sampler and the stop checks, resolved for its prompt.

    Every field has the value that changes nothing (temperature 1, penalty 1, no banned tokens,
    ...), so a row without a setting runs the same batched code as a row with it.
    ``cbkernels.engine.hf_config.GenerationSpec`` fills these from a ``GenerationConfig``
    the way ``model.generate()`` resolves it."""

    max_new_tokens: int = 16
    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is banned until this many tokens were generated
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()  # banned for the first generated token only
    forced_bos_token_id: Optional[int] = None  # forced as the first token after a one-token prompt
    forced_eos_token_ids: tuple[int, ...] = ()  # forced as the last token (at max_new_tokens)
    stop_check: Optional[Callable[[list[int]], bool]] = None  # stop strings: True when tokens end one
    num_return_sequences: int = 1
    return_logprobs: bool = False
    top_logprobs: int = 0  # alternatives returned per token (with their log-probabilities)
    # Derived once (the fields do not change after construction): an argmax row that no logits
    # processor touches and that returns no log-probabilities, the common case a step checks
    # for each of its rows.
    plain_greedy: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.plain_greedy = self.greedy and not self.processes_logits and not (self.return_logprobs or self.top_logprobs)

    @classmethod
    def from_generation_config(cls, gc, prompt_len: Optional[int] = None, **extra) -> "SamplingParams":
        """Read the fields of ``gc`` as they stand (no merging with a model's defaults, which
        ``GenerationSpec`` does first). ``max_length`` / ``min_length`` count the prompt, so
        they are used only when ``prompt_len`` is given; ``max_new_tokens`` None means 20."""
        eos = _ids(gc.eos_token_id)
        if gc.max_new_tokens is not None:
            max_new = gc.max_new_tokens
        elif prompt_len is not None and gc.max_length is not None:
            max_new = gc.max_length - prompt_len
        else:
            max_new = 20
        min_new = gc.min_new_tokens
        if min_new is None:
            min_new = max(0, (gc.min_length or 0) - prompt_len) if prompt_len is not None else 0
        # generate() drops a bad word that is exactly one EOS token (EOS stays reachable).
        bad = tuple(tuple(w) for w in (gc.bad_words_ids or ()) if not (len(w) == 1 and w[0] in eos))
        return cls(
            max_new_tokens=int(max_new), eos_token_ids=eos, do_sample=bool(gc.do_sample),
            temperature=float(gc.temperature if gc.temperature is not None else 1.0),
            top_k=int(gc.top_k or 0), top_p=float(gc.top_p if gc.top_p is not None else 1.0),
            min_p=float(gc.min_p or 0.0),
            repetition_penalty=float(gc.repetition_penalty if gc.repetition_penalty is not None else 1.0),
            min_new_tokens=int(min_new), no_repeat_ngram_size=int(gc.no_repeat_ngram_size or 0),
            bad_words_ids=bad, suppress_tokens=_ids(gc.suppress_tokens),
            begin_suppress_tokens=_ids(gc.begin_suppress_tokens), forced_bos_token_id=gc.forced_bos_token_id,
            forced_eos_token_ids=_ids(gc.forced_eos_token_id),
            num_return_sequences=int(gc.num_return_sequences or 1), **extra,
        )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def processes_logits(self) -> bool:
        """True when some logits processor (beyond the sampling warpers) changes this row."""
        return bool(self.repetition_penalty != 1.0 or (self.min_new_tokens and self.eos_token_ids)
                    or self.no_repeat_ngram_size or self.bad_words_ids or self.suppress_tokens
                    or self.begin_suppress_tokens or self.forced_bos_token_id is not None
                    or self.forced_eos_token_ids)


def _ids(value) -> tuple[int, ...]:
    """None, one id or a list of ids -> a tuple of ids."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


class SampledToken(int):
    """A sampled token id that also carries its log-probability (``logprob``) and, when
    asked for, the most likely alternatives (``top``: ``[(token, logprob), ...]``). It is an
    int everywhere else, so code that only wants the token never notices."""

    logprob: Optional[float]
    top: Optional[list[tuple[int, float]]]

    def __new__(cls, token: int, logprob: Optional[float] = None, top=None):
        obj = super().__new__(cls, token)
        obj.logprob, obj.top = logprob, top
        return obj


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
    pending: int = 0  # sampled tokens not read back yet (asynchronous scheduling: at most one)
    logprobs: list[float] = field(default_factory=list)  # one per generated token, when asked for
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # num_return_sequences > 1: the siblings that wait to adopt this request's prompt blocks
    # once it has computed all but the prompt's last token (the scheduler forks them then).
    pending_children: list["Request"] = field(default_factory=list)
    # Scheduling (docs/scheduling.md): higher priority first; the scheduler step it was queued
    # at (aging); the output length predicted when first admitted (scored when it finishes);
    # computed tokens a preemption dropped, not yet computed again; whether predictive
    # admission ever held it back; its slot in the admission arrays while running.
    priority: int = 0
    queued_step: int = 0
    predicted_output: Optional[int] = None
    dropped_tokens: int = 0
    deferred: bool = False
    admission_slot: int = -1

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (>= 1 for a live request), a sampled token still on its
        way back from the device (asynchronous scheduling) included."""
        return len(self.tokens) + self.pending - self.num_computed

    @property
    def saturated(self) -> bool:
        """Its in-flight token reaches max_new_tokens: nothing more to schedule until it is back."""
        return self.pending > 0 and len(self.tokens) + self.pending - self.prompt_len >= self.params.max_new_tokens

    @property
    def is_done(self) -> bool:
        return self.status in TERMINAL

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
        if isinstance(token, SampledToken):
            if token.logprob is not None:
                self.logprobs.append(token.logprob)
            if token.top is not None:
                self.top_logprobs.append(token.top)
            token = int(token)
        self.tokens.append(token)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def stop_reason(self) -> Optional[str]:
        gen = len(self.tokens) - self.prompt_len
        if gen and self.tokens[-1] in self.params.eos_token_ids:
            return "eos"
        if gen and self.params.stop_check is not None and self.params.stop_check(self.tokens):
            return "stop"
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
            logprobs=list(self.logprobs), top_logprobs=[list(t) for t in self.top_logprobs] or None,
            created_time=self.arrival_time,
            lifespan=(self.first_scheduled_time if self.first_scheduled_time is not None else -1,
                      self.finish_time if self.finish_time is not None else -1),
            timestamps=list(self.token_times),
        )


@dataclass(slots=True)
class RequestOutput:
    """What a request produced. The fields of transformers' ``GenerationOutput`` (request_id,
    prompt_ids, generated_tokens, logprobs, error, status, created_time, lifespan,
    timestamps, ``is_finished()``) and cbkernels' own: finish_reason ("eos", "stop" for a stop
    string, "length", "cancelled", "error"), latencies, preemptions, prefix-cache hits and
    the top alternatives of each token (``top_logprobs``, when asked for)."""

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
    pending: int = 0  # sampled tokens not read back yet (asynchronous scheduling: at most one)
    logprobs: list[float] = field(default_factory=list)  # log-probability of each generated token
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None  # per token: [(token, logprob), ...]
    created_time: float = 0.0  # time.perf_counter() at arrival
    lifespan: tuple[float, float] = (-1, -1)  # (first scheduled, finished); -1 while not yet
    timestamps: Optional[list[float]] = None  # time.perf_counter() of each generated token

    def is_finished(self) -> bool:
        """Finished, cancelled or failed (transformers' ``GenerationOutput.is_finished``)."""
        return self.status in TERMINAL

    @property
    def mean_itl_s(self) -> Optional[float]:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None

"""Asynchronous scheduling: what a launched step leaves in flight.

With ``BatchConfig(async_scheduling=True)`` the engine launches step N, then reads back step
N-1's tokens while the device works on N, then schedules N+1 while the device still works:
the host's per-step work hides behind the device's. Sampled tokens stay on the device as the
next step's inputs (``StepPlan.from_previous``) and come back to the host one step later, in
one asynchronous copy into pinned memory. A request that turns out to have stopped (EOS, a
stop string) had one more row computed for it; that row's token is dropped. Rows whose
sampling needs their token history on the host (repetition penalty, n-gram bans, minimum
lengths, log-probabilities...) make their step sample on the host instead, after the
previous step's tokens are back.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from .requests import Request
from .sampling import all_plain_greedy, distinct_params, warp


def sample_on_device(logits: torch.Tensor, requests: Sequence[Request],
                     generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """Next tokens [S] int64 on the device, or None when some row needs host-side history
    or returns log-probabilities (then the caller samples on the host)."""
    if all_plain_greedy(requests):
        return torch.argmax(logits, dim=-1)
    params = [r.params for r in requests]
    distinct = distinct_params(params)
    if any(p.processes_logits or p.return_logprobs or p.top_logprobs for p in distinct):
        return None
    scores = warp(logits.float(), requests)
    tokens = torch.argmax(scores, dim=-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    index = torch.tensor(drawn, dtype=torch.int64).to(scores.device, non_blocking=True)
    probs = scores.index_select(0, index).softmax(dim=-1)
    return tokens.index_copy(0, index, torch.multinomial(probs, 1, generator=generator).squeeze(1))


class InFlightStep:
    """A launched step: its batch, the row order the runner used, and its sampled tokens
    (on the device, with a copy to the host under way) or its logits (host sampling)."""

    def __init__(self, batch, order, sampling: list[int], rows: list[Request], logits: torch.Tensor,
                 tokens: Optional[torch.Tensor]):
        self.batch, self.order, self.sampling, self.rows = batch, order, sampling, rows
        self.tokens = tokens  # [S] on the device, None when the host samples
        self.logits = logits if tokens is None else None
        self.host_tokens: Optional[list] = None
        # Which row of ``tokens`` each request's next input is (the runner's plan reads it).
        self.rows_of = {r: j for j, r in enumerate(rows)} if tokens is not None else {}
        self._host = self._event = None
        self.wait_s = 0.0  # how long reading the tokens back waited for the device
        if tokens is not None:
            if tokens.is_cuda:
                self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                self._host.copy_(tokens, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
            else:
                self._host = tokens

    @property
    def needs_host_sampling(self) -> bool:
        return self.tokens is None and bool(self.sampling) and self.host_tokens is None

    def sampling_flags(self) -> list[bool]:
        """One entry per ``batch.requests``: whether its row samples a token this step."""
        if len(self.sampling) == len(self.batch.requests):
            return [True] * len(self.sampling)
        flags = [False] * len(self.batch.requests)
        for i in self.sampling:
            flags[self.order[i]] = True
        return flags

    def sampled(self) -> list:
        """One entry per ``batch.requests``: its token (waiting for the copy), or None."""
        if self.host_tokens is None:
            if self._event is not None:
                start = time.perf_counter()
                self._event.synchronize()
                self.wait_s = time.perf_counter() - start
            self.host_tokens = self._host.tolist() if self._host is not None else []
        n = len(self.batch.requests)
        if len(self.host_tokens) == n and isinstance(self.order, range):  # every row sampled, in order
            return list(self.host_tokens)
        result: list = [None] * n
        for i, token in zip(self.sampling, self.host_tokens):
            result[self.order[i]] = token
        return result

"""The adaptive step budget (``BatchConfig(target_itl_ms=...)``).

A running request gets one token a step, so its inter-token latency is the time of a step.
``StepTimeModel`` fits ``ms = a + b * tokens + c * sequences + d * context`` online by least
squares over the recent steps (exponential forgetting, factor ``FORGET`` a step; ``context``:
the tokens the running requests had computed when the step was scheduled, the KV every
decode reads, given by the ``context`` callable); ``StepBudget`` picks each step's token
budget as the most tokens the model predicts to fit in ``scale * target``. Without the
context term a step of many long histories and one of as many short ones looked alike to
the model: the feedback then shrank every budget for the sake of the long ones.
``scale`` tracks the 99th percentile of inter-token latency: after each step it is
multiplied by ``exp(-ETA * w * (exceeded - 0.01))`` (``exceeded``: 1 if the step took
longer than the target; ``w``: the step's sequences over their recent mean, since every
sequence in a step waits for all of it), so it settles where 1% of the tokens' latencies
exceed the target, the machine's jitter and the model's error included. Anti-windup:
``scale`` is kept between the values at which the budget reaches its floor and its cap
(below or above them it changes nothing), so after a slow spell that pinned the budget to
its floor the budget grows back at once instead of first undoing the excess. Decodes
always fit (the budget never drops below the running requests), so what shrinks is the
prefill packed beside them. Until ``WARMUP_STEPS`` steps were seen the budget ramps up
from a small value, which also gives the fit a spread of step sizes.
"""
from __future__ import annotations

import math

import numpy as np

FORGET = 0.99
WARMUP_STEPS = 16
REFIT_EVERY = 4
ETA, MIN_SCALE, MAX_SCALE = 0.1, 0.1, 1.5


class StepTimeModel:
    """``ms ~ a + b * tokens + c * seqs + d * context``, least squares with exponential
    forgetting; a feature that never varied (``context`` without a callable) gets 0."""

    def __init__(self, forget: float = FORGET):
        self.forget = forget
        self.xtx = np.zeros((4, 4))
        self.xty = np.zeros(4)
        self.coef = None  # (a, b, c, d) once fitted
        self.steps = 0

    def predict(self, tokens: float, seqs: float, context: float = 0.0) -> float | None:
        if self.coef is None:
            return None
        a, b, c, d = self.coef
        return a + b * tokens + c * seqs + d * context

    def observe(self, tokens: int, seqs: int, ms: float, context: int = 0) -> None:
        x = np.array([1.0, tokens, seqs, context])
        self.xtx = self.forget * self.xtx + np.outer(x, x)
        self.xty = self.forget * self.xty + x * ms
        self.steps += 1
        if self.steps % REFIT_EVERY == 0 or self.coef is None:
            # a ridge relative to each feature's own scale (context runs to thousands, the
            # intercept's column is ones), and a tiny absolute one for a column of zeros
            ridge = np.diag(1e-6 * np.diag(self.xtx) + 1e-9)
            coef = np.linalg.solve(self.xtx + ridge, self.xty)
            self.coef = (float(coef[0]),) + tuple(max(0.0, float(v)) for v in coef[1:])


class StepBudget:
    """Tokens per step that keep a step within ``target_ms`` (see the module docstring)."""

    def __init__(self, target_ms: float, max_batch_tokens: int, context=None):
        if isinstance(target_ms, bool) or not isinstance(target_ms, (int, float)):
            raise TypeError(f"target_itl_ms must be a number, got {type(target_ms).__name__}")
        if not target_ms > 0 or target_ms == float("inf"):
            raise ValueError(f"target_itl_ms must be a positive number of milliseconds, got {target_ms}")
        self.target_ms = float(target_ms)
        self.max_batch_tokens = max_batch_tokens
        self.model = StepTimeModel()
        self.scale = 1.0  # the share of the target the model aims at (feedback on the observed p99)
        self._span = (MIN_SCALE, MAX_SCALE)  # the scales between the budget's floor and cap (anti-windup)
        self._mean_seqs = 0.0
        if context is not None and not callable(context):
            raise TypeError(f"context must be a callable or None, got {type(context).__name__}")
        self.context = context  # () -> the running requests' computed tokens
        self._context = 0  # at the last budget() call: what observe() pairs the step's time with

    def budget(self, running: int) -> int:
        floor = min(self.max_batch_tokens, max(1, running))
        m = self.model
        self._context = ctx = self.context() if self.context is not None else 0
        if m.steps < WARMUP_STEPS or m.coef is None:
            ramp = max(16, self.max_batch_tokens * (m.steps + 1) // (4 * WARMUP_STEPS))
            return max(floor, min(self.max_batch_tokens, ramp))
        a, b, c, d = m.coef
        fixed = a + c * (running + 1) + d * ctx
        self._span = (max(MIN_SCALE, (fixed + b * floor) / self.target_ms),
                      min(MAX_SCALE, (fixed + b * self.max_batch_tokens) / self.target_ms))
        room = self.scale * self.target_ms - fixed
        if b <= 0.0:
            return self.max_batch_tokens if room > 0 else floor
        return max(floor, min(self.max_batch_tokens, int(room / b)))

    def observe(self, tokens: int, seqs: int, seconds: float) -> None:
        ms = 1e3 * seconds
        self.model.observe(tokens, seqs, ms, self._context)
        self._mean_seqs = seqs if not self._mean_seqs else 0.99 * self._mean_seqs + 0.01 * seqs
        weight = min(4.0, seqs / self._mean_seqs)
        exceeded = 1.0 if ms > self.target_ms else 0.0
        lo, hi = self._span
        self.scale = min(max(lo, hi), max(lo, self.scale * math.exp(-ETA * weight * (exceeded - 0.01))))

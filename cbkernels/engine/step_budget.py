"""The adaptive step budget (``BatchConfig(target_itl_ms=...)``).

A running request gets one token a step, so its inter-token latency is the time of a step.
``StepTimeModel`` fits ``ms = a + b * tokens + c * sequences + d * context`` online by least
squares over the recent steps (exponential forgetting, factor ``FORGET`` a step; ``context``:
the tokens the running requests had computed when the step was scheduled, the KV every
decode reads, given by the ``context`` callable); ``StepBudget`` picks each step's token
budget as the most tokens the model predicts to fit in ``scale * target``. Without the
context term a step of many long histories and one of as many short ones looked alike to
the model: the feedback then shrank every budget for the sake of the long ones.
``scale`` is the share of the target the model aims at: one over the 99th percentile of the
ratio of a step's time to the model's prediction for it, over the recent steps, each step
weighted by its sequences (every sequence in a step waits for all of it, so the tokens'
latencies are the steps' times weighted that way; ``RatioQuantile``). A machine whose steps
of equal makeup vary by 1.8x at the 99th percentile gets a scale near 0.55: the median step
aims at 55% of the target so that 1% of the tokens wait longer than it. Every step teaches
the quantile, so the scale learnt while few sequences run holds when a burst arrives;
feedback on the target's exceedances alone (the first design) learnt from 1% of the steps
and came down only after a burst's first steps had overshot. Decodes always fit (the
budget never drops below the running requests), so what shrinks is the prefill packed
beside them; ``admits`` keeps a new sequence waiting while the running ones' decodes,
predicted with it, would leave the target (a prefill budget cannot shorten those steps).
``level``, a fast moving average of time over prediction, follows the machine's speed
(a slow spell moves it within a few steps); the model fits the times divided by it, so its
coefficients stay those of the usual speed through a spell, and the aim is
``scale * target / level`` in the model's units. Until ``WARMUP_STEPS`` steps were seen
the budget ramps up from a small value, which also gives the fit a spread of step sizes.
"""
from __future__ import annotations

import math

import numpy as np

FORGET = 0.99
WARMUP_STEPS = 16
REFIT_EVERY = 4
MIN_SCALE, MAX_SCALE = 0.1, 1.5
QUANTILE, QUANTILE_FORGET, QUANTILE_MIN_STEPS = 0.99, 0.998, 32
LEVEL_RATE, ANCHOR_RATE = 0.2, 0.002


class RatioQuantile:
    """A weighted quantile of positive ratios with exponential forgetting: a histogram of
    ``log(ratio)`` over ``[LOG_LO, LOG_HI]`` (ratios of 0.37 to 7.4; outside, the end bins),
    bounded memory, the value rounded up to its bin's upper edge (2% wide)."""

    LOG_LO, LOG_HI, BINS = -1.0, 2.0, 150
    WIDTH = (LOG_HI - LOG_LO) / BINS

    def __init__(self, q: float = QUANTILE, forget: float = QUANTILE_FORGET):
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must be in (0, 1), got {q}")
        self.q, self.forget = q, forget
        self.weights = np.zeros(self.BINS)
        self.total = 0.0
        self.count = 0

    def add(self, ratio: float, weight: float = 1.0) -> None:
        if not ratio > 0 or not weight > 0:
            return
        i = min(self.BINS - 1, max(0, int((math.log(ratio) - self.LOG_LO) // self.WIDTH)))
        self.weights *= self.forget
        self.weights[i] += weight
        self.total = self.forget * self.total + weight
        self.count += 1

    def value(self) -> float | None:
        """The smallest bin edge with at most ``1 - q`` of the weight above it."""
        if not self.count:
            return None
        above = np.cumsum(self.weights[::-1])  # above[k]: weight in the top k + 1 bins
        k = int(np.searchsorted(above, (1.0 - self.q) * self.total, side="right"))
        return math.exp(self.LOG_LO + (self.BINS - k) * self.WIDTH)


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

    def rescale(self, k: float) -> None:
        """Measure times in units ``k`` times smaller: every coefficient times ``k``."""
        self.xty *= k
        if self.coef is not None:
            self.coef = tuple(k * c for c in self.coef)

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
        self.scale = 1.0  # the share of the target the model aims at: 1 / the ratios' 99th percentile
        self.ratios = RatioQuantile()  # a step's time over the model's prediction, weighted by its sequences
        self.level = 1.0  # the recent steps' time over prediction (a moving average): a machine's slow spell
        self._level_mean = 1.0  # the level's slow moving average (``_anchor``)
        self.floor_steps = 0  # steps whose decodes alone were predicted to take longer than the aim
        if context is not None and not callable(context):
            raise TypeError(f"context must be a callable or None, got {type(context).__name__}")
        self.context = context  # () -> the running requests' computed tokens
        self._context = 0  # at the last budget() call: what observe() pairs the step's time with

    def _fitted(self) -> bool:
        return self.model.steps >= WARMUP_STEPS and self.model.coef is not None

    def _fixed_ms(self, seqs: int, ctx: float) -> float:
        a, _, c, d = self.model.coef
        return a + c * seqs + d * ctx

    def budget(self, running: int) -> int:
        floor = min(self.max_batch_tokens, max(1, running))
        m = self.model
        self._context = ctx = self.context() if self.context is not None else 0
        if not self._fitted():
            ramp = max(16, self.max_batch_tokens * (m.steps + 1) // (4 * WARMUP_STEPS))
            return max(floor, min(self.max_batch_tokens, ramp))
        b = m.coef[1]
        room = self.aim_ms() - self._fixed_ms(running + 1, ctx)
        if room < b * floor:
            self.floor_steps += 1
        if b <= 0.0:
            return self.max_batch_tokens if room > 0 else floor
        return max(floor, min(self.max_batch_tokens, int(room / b)))

    def _anchor(self) -> None:
        """Keep the level's long-run mean at 1: the model fits times divided by the level, so
        a noisy level could drift one way and the model's units the other (the fit of
        ``ms / level`` is biased up when the level is noisy, which lowers the next ratios).
        Dividing the level by its slow mean and multiplying the model by it changes no
        prediction; a slow spell is folded into the model only over hundreds of steps."""
        k = self._level_mean
        self.level /= k
        self._level_mean = 1.0
        self.model.rescale(k)

    def sequence_tokens(self) -> int:
        """A sequence's own cost in a step (the model's per-sequence term) as tokens of the
        budget: what admitting one more sequence than the budget counted takes from it."""
        if not self._fitted() or self.model.coef[1] <= 0.0:
            return 0
        return math.ceil(self.model.coef[2] / self.model.coef[1])

    def aim_ms(self) -> float:
        """What a step may take in the model's units (the machine's usual speed)."""
        return self.scale * self.target_ms / self.level

    def admits(self, running: int, context: int) -> bool:
        """Whether a step of decodes only, the ``running`` requests' and one more sequence's,
        reading ``context`` tokens of history in all, is predicted to keep within the aim."""
        if not self._fitted() or running == 0:
            return True
        seqs = running + 1
        return self._fixed_ms(seqs, context) + self.model.coef[1] * seqs <= self.aim_ms()

    def observe(self, tokens: int, seqs: int, seconds: float) -> None:
        ms = 1e3 * seconds
        m = self.model
        unit = m.predict(tokens, seqs, self._context) if m.steps >= WARMUP_STEPS else None
        m.observe(tokens, seqs, ms / self.level, self._context)
        if unit is not None and unit > 0:
            ratio = ms / unit  # this step's speed
            self.ratios.add(ratio / self.level, seqs)
            self.level = min(4.0, max(0.25, self.level + LEVEL_RATE * (min(max(ratio, 0.25), 4.0) - self.level)))
            self._level_mean += ANCHOR_RATE * (self.level - self._level_mean)
            if m.steps % REFIT_EVERY == 0:
                self._anchor()
            if self.ratios.count >= QUANTILE_MIN_STEPS:
                self.scale = min(MAX_SCALE, max(MIN_SCALE, 1.0 / self.ratios.value()))

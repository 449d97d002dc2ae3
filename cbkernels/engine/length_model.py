"""The length model: what the engine has learned about how long requests get.

Finished requests teach it; the scheduler asks it how many tokens a request will still
generate. Memory is bounded and the estimate follows drift:

* output lengths go into streaming histograms, one per (``max_new_tokens`` bucket, prompt
  length bucket) and one per ``max_new_tokens`` bucket alone (buckets are powers of two);
  a histogram of the bucket whose cap is ``2**b`` has ``BINS`` equal bins of
  ``2**b / BINS`` tokens, so its quantiles are exact to one bin;
* when a histogram holds ``HALF_LIFE`` requests its counts are halved: old requests weigh
  half as much as new ones after each ``HALF_LIFE`` finishes;
* a prediction uses the finest histogram with ``MIN_SAMPLES`` requests, else the prior:
  the request's own ``max_new_tokens`` (nothing is known, so assume the worst);
* prompt lengths go into one histogram of power-of-two bins (``prompt_quantile``).

``predict`` answers "given that it has already generated ``g`` tokens, how many will it
have at the end, at quantile ``q``" (the distribution conditioned on length > g), clamped
to ``[g + 1, max_new_tokens]``. ``record`` also scores the prediction made for the request
when it was admitted: the prediction error is an engine metric.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

BINS = 64
MIN_SAMPLES = 8
ERROR_WINDOW = 1024  # the prediction error is over this many most recent finished requests
HALF_LIFE = 1024


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_quantile(q) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"q must be a number, got {type(q).__name__}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")


def bucket_of(n: int) -> int:
    """The power-of-two bucket of a positive length: lengths in [2**(b-1), 2**b) share b."""
    return max(1, n).bit_length()


class Histogram:
    """Counts of lengths in ``(0, cap]`` in ``BINS`` equal bins (bin i: (i*w, (i+1)*w])."""

    __slots__ = ("cap", "width", "counts", "total", "_cum")

    def __init__(self, cap: int):
        self.cap = cap
        self.width = cap / BINS
        self.counts = [0.0] * BINS
        self.total = 0.0
        self._cum: Optional[list[float]] = None  # cumulative counts, rebuilt after an update

    def add(self, length: int) -> None:
        i = min(BINS - 1, max(0, math.ceil(length / self.width) - 1))
        self.counts[i] += 1.0
        self.total += 1.0
        self._cum = None
        if self.total >= HALF_LIFE:
            self.counts = [c / 2 for c in self.counts]
            self.total /= 2

    def _cumulative(self) -> list[float]:
        if self._cum is None:
            acc, cum = 0.0, []
            for c in self.counts:
                acc += c
                cum.append(acc)
            self._cum = cum
        return self._cum

    def mass_at_most(self, x: float) -> float:
        """Counts at lengths <= x (uniform within a bin)."""
        if x <= 0:
            return 0.0
        if x >= self.cap:
            return self.total
        pos = x / self.width
        i = int(pos)
        below = self._cumulative()[i - 1] if i else 0.0
        return below + self.counts[i] * (pos - i)

    def quantile_above(self, g: float, q: float) -> Optional[float]:
        """The q-quantile of lengths > g (None when no mass lies above g)."""
        cum = self._cumulative()
        base = self.mass_at_most(g)
        above = self.total - base
        if above <= 1e-9:
            return None
        target = base + q * above
        lo, hi = 0, BINS - 1
        while lo < hi:  # the first bin whose cumulative count reaches target
            mid = (lo + hi) // 2
            if cum[mid] >= target:
                hi = mid
            else:
                lo = mid + 1
        prev = cum[lo - 1] if lo else 0.0
        inside = (target - prev) / self.counts[lo] if self.counts[lo] else 1.0
        return max(g, (lo + inside) * self.width)


class LengthModel:
    """Output lengths learned online from finished requests (see the module docstring)."""

    def __init__(self, min_samples: int = MIN_SAMPLES):
        _check_int("min_samples", min_samples, 1)
        self.min_samples = min_samples
        self._fine: dict[tuple[int, int], Histogram] = {}
        self._coarse: dict[int, Histogram] = {}
        self._prompts = [0.0] * 40  # prompt lengths in power-of-two bins
        self.observed = 0
        self.scored = 0
        # (|predicted - actual|, that / actual) of the most recent scored requests
        self._errors: deque = deque(maxlen=ERROR_WINDOW)

    def _histograms(self, prompt_len: int, max_new: int) -> tuple[Histogram, Histogram]:
        mb, pb = bucket_of(max_new), bucket_of(prompt_len)
        coarse = self._coarse.get(mb)
        if coarse is None:
            coarse = self._coarse[mb] = Histogram(1 << mb)
        fine = self._fine.get((mb, pb))
        if fine is None:
            fine = self._fine[(mb, pb)] = Histogram(1 << mb)
        return fine, coarse

    def record(self, prompt_len: int, max_new: int, output_len: int, predicted: Optional[int] = None) -> None:
        """A request finished with ``output_len`` generated tokens; ``predicted`` is what was
        predicted for it when it was admitted (scored for the error metric)."""
        _check_int("prompt_len", prompt_len, 1)
        _check_int("max_new", max_new, 1)
        _check_int("output_len", output_len, 1)
        for h in self._histograms(prompt_len, max_new):
            h.add(output_len)
        self._prompts[min(39, bucket_of(prompt_len))] += 1.0
        self.observed += 1
        if predicted is not None:
            err = abs(predicted - output_len)
            self.scored += 1
            self._errors.append((err, err / output_len))

    def predict(self, prompt_len: int, max_new: int, generated: int = 0, q: float = 0.5) -> int:
        """Predicted total output tokens of a request that has generated ``generated`` so far
        and is still running, at quantile ``q``; in ``[generated + 1, max_new]``."""
        _check_int("prompt_len", prompt_len, 1)
        _check_int("max_new", max_new, 1)
        _check_int("generated", generated, 0)
        _check_quantile(q)
        if generated >= max_new:
            return max_new
        mb, pb = bucket_of(max_new), bucket_of(prompt_len)
        for h in (self._fine.get((mb, pb)), self._coarse.get(mb)):
            if h is None or h.total < self.min_samples:
                continue
            value = h.quantile_above(generated, q)
            if value is not None:
                return min(max_new, max(generated + 1, math.ceil(value)))
        return max_new

    def knows(self, prompt_len: int, max_new: int) -> bool:
        """Whether ``predict`` answers from data for this request (else with the prior)."""
        mb, pb = bucket_of(max_new), bucket_of(prompt_len)
        return any(h is not None and h.total >= self.min_samples
                   for h in (self._fine.get((mb, pb)), self._coarse.get(mb)))

    def prompt_quantile(self, q: float) -> Optional[int]:
        """An upper bound (the next power of two) of the q-quantile of prompt lengths seen."""
        _check_quantile(q)
        total = sum(self._prompts)
        if not total:
            return None
        acc = 0.0
        for b, c in enumerate(self._prompts):
            acc += c
            if acc >= q * total:
                return (1 << b) - 1 if b else 0
        return None

    @property
    def mean_abs_error_tokens(self) -> Optional[float]:
        """Mean |predicted - actual| output tokens over the recent scored requests."""
        return sum(e for e, _ in self._errors) / len(self._errors) if self._errors else None

    @property
    def mean_rel_error(self) -> Optional[float]:
        """Mean |predicted - actual| / actual over the recent scored requests."""
        return sum(r for _, r in self._errors) / len(self._errors) if self._errors else None

    def num_histograms(self) -> int:
        return len(self._fine) + len(self._coarse)

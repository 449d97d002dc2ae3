"""Engine metrics: a snapshot dict (``Engine.metrics()``) and a Prometheus exporter.

Recorded: active and waiting requests, TTFT, inter-token latency (ITL), end-to-end
latency, generated tokens/s, cache occupancy, prefix-cache hit rate, and the padding a
padded ``[B, max_len]`` batch would have computed that the packed batches did not; from
the scheduler (``scheduling_snapshot``): preemptions' recomputed tokens, admissions held
back by prediction, the length model's error, the step budget.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

# Latency samples kept for the snapshot's means and percentiles (the last N of each kind).
LATENCY_WINDOW = 4096


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def percentile(values, q: float):
    """The q-quantile (q in [0, 1]) of ``values``, interpolating linearly between the two
    nearest ranks (numpy's default): the one definition every table and JSON file uses.
    None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(slots=True)
class EngineMetrics:
    steps: int = 0
    batch_tokens: int = 0  # tokens computed in packed batches
    padded_tokens: int = 0  # what [num_seqs, longest chunk] batches would have computed
    generated_tokens: int = 0
    preemptions: int = 0
    failed: int = 0
    finished: int = 0
    busy_s: float = 0.0  # wall time inside step()
    peak_used_blocks: int = 0  # most cache blocks in use after any step
    async_steps: int = 0  # steps launched without waiting for their tokens (asynchronous scheduling)
    # Host time of recent steps (wall time of a step minus its model forward and, on CUDA, the
    # host's waits for the device: before sampling, and for an in-flight step's tokens), seconds.
    host_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # Latency samples of the most recent requests only: a long-running server must not keep
    # every sample it ever saw. The mean and percentiles are over this window.
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    itl_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    e2e_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def record_step(self, num_tokens: list[int], generated: int, preempted: int, seconds: float,
                    used_blocks: int = 0, device_s: float = 0.0) -> None:
        self.steps += 1
        self.host_s.append(seconds - device_s)
        self.peak_used_blocks = max(self.peak_used_blocks, used_blocks)
        self.batch_tokens += sum(num_tokens)
        self.padded_tokens += len(num_tokens) * max(num_tokens, default=0)
        self.generated_tokens += generated
        self.preemptions += preempted
        self.busy_s += seconds

    def record_request(self, out) -> None:
        if out.error is not None:
            self.failed += 1
            return
        self.finished += 1
        if out.ttft_s is not None:
            self.ttft_s.append(out.ttft_s)
        self.itl_s.extend(out.itl_s)
        if out.e2e_s is not None:
            self.e2e_s.append(out.e2e_s)

    def snapshot(self, *, active: int, waiting: int, cache) -> dict:
        return {
            "active_requests": active,
            "waiting_requests": waiting,
            "finished_requests": self.finished,
            "failed_requests": self.failed,
            "steps": self.steps,
            "computed_tokens": self.batch_tokens,
            "generated_tokens": self.generated_tokens,
            "generated_tokens_per_s": self.generated_tokens / self.busy_s if self.busy_s else 0.0,
            "ttft_mean_s": _mean(self.ttft_s),
            "ttft_p50_s": percentile(self.ttft_s, 0.5),
            "ttft_p90_s": percentile(self.ttft_s, 0.9),
            "itl_mean_s": _mean(self.itl_s),
            "itl_p50_s": percentile(self.itl_s, 0.5),
            "itl_p90_s": percentile(self.itl_s, 0.9),
            "e2e_mean_s": _mean(self.e2e_s),
            "cache_occupancy": cache.occupancy(),
            "cache_peak_occupancy": self.peak_used_blocks / cache.num_blocks,
            "cache_free_blocks": cache.get_num_free_blocks(),
            "cache_num_blocks": cache.num_blocks,
            "prefix_hit_rate": cache.prefix_hit_rate(),
            "padding_saved": 1.0 - self.batch_tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "preemptions": self.preemptions,
            "async_steps": self.async_steps,
            "host_ms_per_step_p50": None if not self.host_s else 1e3 * percentile(self.host_s, 0.5),
            "timestamp": time.time(),
        }


def scheduling_snapshot(sched) -> dict:
    """What the scheduler did (docs/scheduling.md): recomputation after preemption, admissions
    held back by prediction, how well output lengths were predicted, the step budget."""
    lm, p = sched.length_model, sched.predictive
    return {
        "admission": "greedy" if p is None else "predictive",
        # computed tokens preemptions dropped that had to be computed again (prefix-cache hits excluded)
        "recomputed_tokens": sched.recomputed_tokens,
        "admissions_deferred_by_prediction": 0 if p is None else p.deferred,  # requests held back at least once
        "length_prediction_error": lm.mean_rel_error,  # mean |predicted - actual| / actual output length
        "length_prediction_error_tokens": lm.mean_abs_error_tokens,
        "length_predictions_scored": lm.scored,
        "length_prediction_misses": 0 if p is None else p.misses,  # running past the predicted end
        "admission_margin": None if p is None else p.margin,  # share of the cache held back
        "step_budget_tokens": sched.last_budget,  # the last step's token budget
        "step_budget_mean_tokens": sched.mean_budget(),
        "target_itl_ms": None if sched.step_budget is None else sched.step_budget.target_ms,
        # requests kept waiting because the decodes with them were predicted to exceed the target
        "admissions_deferred_by_target": sched.deferred_by_target,
        # steps whose decodes alone were predicted over the target's aim: a target tighter than the running set allows
        "step_budget_floor_steps": 0 if sched.step_budget is None else sched.step_budget.floor_steps,
        "step_budget_scale": None if sched.step_budget is None else sched.step_budget.scale,
    }


class PrometheusExporter:
    """Publishes ``engine.metrics()`` as Prometheus gauges (``prometheus_client``, the
    optional extra ``cbkernels[metrics]``). Call ``update()`` after steps, then scrape
    ``exposition()`` or serve the registry with ``prometheus_client.start_http_server``."""

    def __init__(self, engine, registry=None, prefix: str = "cbkernels"):
        try:
            import prometheus_client
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("PrometheusExporter needs prometheus_client: pip install 'cbkernels[metrics]'") from e
        self._prom = prometheus_client
        self.engine = engine
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.gauges = {}
        for key, value in engine.metrics().items():
            if key != "timestamp" and (value is None or isinstance(value, (int, float))):
                self.gauges[key] = prometheus_client.Gauge(f"{prefix}_{key}", key.replace("_", " "),
                                                           registry=self.registry)
        self.update()

    def update(self) -> None:
        for key, value in self.engine.metrics().items():
            if key in self.gauges and value is not None:
                self.gauges[key].set(value)

    def exposition(self) -> bytes:
        self.update()
        return self._prom.generate_latest(self.registry)

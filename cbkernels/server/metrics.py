"""``GET /metrics``: Prometheus text format (prometheus_client), one registry per server.

Measured by the server as requests end: time to first token and inter-token latency
(histograms, from each request's ``RequestOutput``), end-to-end latency, prompt and generated
tokens, finished requests by reason, HTTP requests by status code. Read from the engine at
scrape time: running and waiting requests, cache blocks (total, free, occupancy), prefix
cache hit rate, preemptions, steps; the scheduler's recomputed tokens, deferred admissions
and, with ``target_itl_ms``, the target, the step budget and its aim.
"""
from __future__ import annotations

from typing import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

# engine.metrics() key -> (metric name, kind, help)
ENGINE_FIELDS = {
    "active_requests": ("requests_running", "gauge", "requests the engine is running (prefill or decode)"),
    "waiting_requests": ("requests_waiting", "gauge", "requests queued in the engine, not yet scheduled"),
    "cache_num_blocks": ("cache_blocks", "gauge", "KV cache blocks per layer"),
    "cache_free_blocks": ("cache_free_blocks", "gauge", "KV cache blocks free (prefix-cached blocks included)"),
    "cache_occupancy": ("cache_occupancy_ratio", "gauge", "fraction of KV cache blocks held by requests"),
    "prefix_hit_rate": ("prefix_cache_hit_ratio", "gauge", "prompt tokens served from the prefix cache / queried"),
    "preemptions": ("preemptions", "counter", "requests preempted (recomputed later) for lack of blocks"),
    "steps": ("engine_steps", "counter", "engine steps run"),
    "generated_tokens": ("engine_generated_tokens", "counter", "tokens the engine generated"),
    "recomputed_tokens": ("recomputed_tokens", "counter", "computed tokens preemption dropped and admission recomputed"),
    "admissions_deferred_by_prediction": ("admissions_deferred_by_prediction", "counter",
                                          "requests predictive admission held back at least once"),
    "target_itl_ms": ("target_itl_ms", "gauge", "the inter-token latency target the step budget keeps to (if set)"),
    "step_budget_tokens": ("step_budget_tokens", "gauge", "the last engine step's token budget"),
    "step_budget_scale": ("step_budget_scale", "gauge", "the share of target_itl_ms the median step aims at"),
    "admissions_deferred_by_target": ("admissions_deferred_by_target", "counter",
                                      "requests kept waiting because the decodes with them would miss target_itl_ms"),
}


class _EngineCollector:
    def __init__(self, snapshot: Callable[[], dict], in_flight: Callable[[], int], prefix: str):
        self._snapshot, self._in_flight, self._prefix = snapshot, in_flight, prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snapshot()
        for key, (name, kind, doc) in ENGINE_FIELDS.items():
            value = snap.get(key)
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"{self._prefix}_{name}", doc, value=float(value))
        yield GaugeMetricFamily(f"{self._prefix}_server_sequences_in_flight",
                                "sequences admitted by the HTTP server and not yet finished", value=self._in_flight())


class ServerMetrics:
    def __init__(self, engine_snapshot: Callable[[], dict], in_flight: Callable[[], int], prefix: str = "cbkernels"):
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the server's /metrics needs prometheus_client: pip install 'cbkernels[serve]'") from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.ttft = prom.Histogram(f"{prefix}_time_to_first_token_seconds", "arrival to first generated token",
                                   buckets=TTFT_BUCKETS, registry=r)
        self.itl = prom.Histogram(f"{prefix}_inter_token_latency_seconds", "time between consecutive tokens",
                                  buckets=ITL_BUCKETS, registry=r)
        self.e2e = prom.Histogram(f"{prefix}_request_duration_seconds", "arrival to last token",
                                  buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = prom.Counter(f"{prefix}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = prom.Counter(f"{prefix}_generation_tokens", "tokens generated for finished requests",
                                              registry=r)
        self.finished = prom.Counter(f"{prefix}_requests_finished", "engine requests ended, by reason",
                                     ["reason"], registry=r)
        self.http = prom.Counter(f"{prefix}_http_requests", "HTTP requests answered, by route and status code",
                                 ["method", "path", "status"], registry=r)
        r.register(_EngineCollector(engine_snapshot, in_flight, prefix))

    def observe_output(self, out) -> None:
        """Record one ended engine request (called from its pump thread; the client is thread-safe)."""
        reason = out.finish_reason or ("error" if out.error else "unknown")
        self.finished.labels(reason=reason).inc()
        self.prompt_tokens.inc(len(out.prompt_ids))
        self.generation_tokens.inc(len(out.generated_tokens))
        if out.error is not None:
            return
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)
        for gap in out.itl_s:
            self.itl.observe(gap)
        if out.e2e_s is not None:
            self.e2e.observe(out.e2e_s)

    def observe_http(self, method: str, path: str, status: int) -> None:
        self.http.labels(method=method, path=path, status=str(status)).inc()

    def exposition(self) -> bytes:
        """The text format (blocking: reads the engine's metrics under its lock)."""
        return self._prom.generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        return self._prom.CONTENT_TYPE_LATEST

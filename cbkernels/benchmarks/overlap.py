"""The engine with and without asynchronous scheduling, same prompts, same run.

On a GPU the host schedules and builds step N+1 while the device runs step N, so tokens/s
should rise by about the host's share of a step. On a CPU the host and the "device" are the
same cores and nothing can overlap: expect parity there (the check is that it costs nothing).
Also prints how the cache was sized (``engine.metrics()["cache_sizing"]``).
"""
from __future__ import annotations

import time

from .common import report


def run_overlap(model, prompts, generation_config, out_dir=None, **config) -> list[dict]:
    from ..engine import BatchConfig, Engine

    rows = []
    for overlap in (False, True, False, True):  # interleaved: a slow phase of the machine hits both
        engine = Engine(model, BatchConfig(async_scheduling=overlap, **config))
        engine.generate(prompts[:2], generation_config)  # warm-up (first launches compile on CUDA)
        start = time.perf_counter()
        outputs = engine.generate(prompts, generation_config)
        wall = time.perf_counter() - start
        m = engine.metrics()
        rows.append({"async_scheduling": overlap, "requests": len(prompts),
                     "tokens": sum(len(o.generated_tokens) for o in outputs), "wall_s": wall,
                     "tokens_per_s": sum(len(o.generated_tokens) for o in outputs) / wall,
                     "host_ms_per_step_p50": m["host_ms_per_step_p50"], "async_steps": m["async_steps"],
                     "cache_tokens": m["cache_tokens"], "cache_sizing": m["cache_sizing"]})
    base = [r["tokens_per_s"] for r in rows if not r["async_scheduling"]]
    for r in rows:
        r["vs_sync"] = r["tokens_per_s"] / max(base)
    report("overlap", rows, ["async_scheduling", "requests", "tokens", "wall_s", "tokens_per_s", "vs_sync",
                             "host_ms_per_step_p50", "async_steps"], out_dir)
    print(f"KV cache: {rows[0]['cache_tokens']} tokens ({rows[0]['cache_sizing']})")
    return rows

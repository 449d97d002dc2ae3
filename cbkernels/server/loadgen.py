"""A load generator for OpenAI-compatible servers (``cbkernels bench serve``): streamed chat
requests over HTTP (httpx), closed loops and Poisson arrivals, measured at the client.

Per request: TTFT (request sent -> first content chunk), ITL (gaps between content chunks),
output tokens (the server's ``usage``, else the content chunks), errors (HTTP status, error
events, transport errors), 5xx, lost (a stream that ends without a finish reason, or no answer
within PHASE_TIMEOUT_S). A stream is complete at its finish reason: ``data: [DONE]`` is optional
(transformers serve does not send it).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

START_BUDGET_S = 60.0  # a closed loop starts no new request after this (a slow server does fewer requests)
PHASE_TIMEOUT_S = 600.0  # requests still unanswered then count as lost


@dataclass
class Sample:
    ok: bool = False
    status: int = 0
    tokens: int = 0
    ttft_s: float | None = None
    itl_s: list = field(default_factory=list)
    error: str | None = None
    lost: bool = False


def _pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(system: str, mode: str, clients, samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    itl = [x for s in ok for x in s.itl_s]
    return {"system": system, "mode": mode, "clients": clients, "requests": len(samples), "ok": len(ok),
            "errors": len(samples) - len(ok), "5xx": sum(500 <= s.status < 600 for s in samples),
            "lost": sum(s.lost for s in samples), "wall_s": wall_s, "req_per_s": len(ok) / wall_s,
            "out_tok_per_s": sum(s.tokens for s in ok) / wall_s, "ttft_p50_ms": _pct(ttft, 0.5) * 1e3,
            "ttft_p99_ms": _pct(ttft, 0.99) * 1e3, "itl_p50_ms": _pct(itl, 0.5) * 1e3,
            "itl_p99_ms": _pct(itl, 0.99) * 1e3, "loadavg_1m": os.getloadavg()[0]}


async def _request(client, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sample, start, last, chunks, finished = Sample(), time.perf_counter(), None, 0, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            sample.status = resp.status_code
            if resp.status_code != 200:
                sample.error = (await resp.aread()).decode(errors="replace")[:200]
                return sample
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                obj = json.loads(line[6:])
                if obj.get("error"):
                    sample.error = str(obj["error"].get("message"))[:200]
                if obj.get("usage"):
                    sample.tokens = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            sample.ttft_s = now - start
                        else:
                            sample.itl_s.append(now - last)
                        last, chunks = now, chunks + 1
                    finished = finished or choice.get("finish_reason") is not None
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point, not a crash
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
        return sample
    sample.tokens = sample.tokens or chunks
    sample.lost = not finished and sample.error is None
    sample.ok = finished and sample.error is None
    return sample


async def _closed_loop(url, model, prompts, clients, total, max_tokens):
    import httpx

    order, started = iter(range(total)), []
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=PHASE_TIMEOUT_S, limits=limits) as client:
        async def worker():
            for i in order:
                if time.perf_counter() - start > START_BUDGET_S:
                    return
                started.append(i)
                samples.append(await _request(client, url, model, prompts[i % len(prompts)], max_tokens))

        start = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), PHASE_TIMEOUT_S)
        except asyncio.TimeoutError:  # what has not answered by now is lost
            samples += [_timed_out() for _ in range(len(started) - len(samples))]
        return samples, time.perf_counter() - start


def _timed_out() -> Sample:
    return Sample(lost=True, error=f"no answer within {PHASE_TIMEOUT_S:.0f} s")


async def _open_loop(url, model, prompts, rate, total, max_tokens, seed=0):
    import httpx

    rng, delay, tasks = random.Random(seed), 0.0, []
    async with httpx.AsyncClient(timeout=PHASE_TIMEOUT_S, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        for i in range(total):
            delay += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
            tasks.append(asyncio.ensure_future(_request(client, url, model, prompts[i % len(prompts)],
                                                        max_tokens)))
        done, pending = await asyncio.wait(tasks, timeout=PHASE_TIMEOUT_S)
        for task in pending:
            task.cancel()
        samples = [t.result() for t in tasks if t in done] + [_timed_out() for _ in pending]
        return samples, time.perf_counter() - start


def http_closed(system, url, model, prompts, clients, total, max_tokens) -> dict:
    """``clients`` clients in a closed loop over ``prompts`` (chat messages), ``total`` requests."""
    return summarize(system, "closed", clients, *asyncio.run(_closed_loop(url, model, prompts, clients, total,
                                                                          max_tokens)))


def http_open(system, url, model, prompts, rate, total, max_tokens) -> dict:
    """``total`` requests arriving as a Poisson process of ``rate`` per second."""
    samples, wall = asyncio.run(_open_loop(url, model, prompts, rate, total, max_tokens))
    return summarize(system, f"poisson {rate:g}/s", "-", samples, wall)

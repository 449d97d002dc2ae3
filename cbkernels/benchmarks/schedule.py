"""Adaptive scheduling: greedy against predictive admission, fixed against adaptive step budget.

Three workloads of output lengths (``WORKLOADS``): uniform, long-tailed (log-normal) and
bimodal (chat answers beside long documents: long prompts, long outputs); every request
may generate up to the same ``max_new_tokens`` cap, so only what the engine learns tells
them apart. Each request ends at its drawn length through its stop check (as a stop string
would end it), so the scheduler does not know the length in advance. Requests arrive as a
Poisson process at ``OVERLOAD`` times the rate greedy admission serves them (measured first
on the same workload, all requests at once), in three priority classes; the cache is small
enough that greedy admission preempts. Part 1 keeps time on the process's CPU clock
(``_Clock``): on a shared machine that is what compares runs, the wall clock moves with
whatever else runs. Part 2 controls wall-clock latency, so it is timed on the wall clock.

Part 1 (``admission``): per workload, greedy vs predictive: preemptions, recomputed tokens,
output tokens/s, TTFT and ITL p50/p99, the length model's error, longest wait per priority.
Part 2 (``budget``): fixed budgets from ``FIXED_BUDGETS`` against ``target_itl_ms`` set to
each of ``TARGET_FACTORS`` times the decode-only step time, on the bimodal workload and a wider random
Llama (hidden 256, 4 layers: a step's time grows with its tokens): p99 ITL against
throughput. The embedded SmolLM2 runs a short part 1 on the bimodal workload
(``--model smollm2``); the tiny random Llama (CPU-fast) runs everything.
"""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict

from .common import device_name, pyplot, report

# name -> (number of requests, draw(rng) -> (prompt_len, output_len))
CAP = 384  # max_new_tokens of every request
PRIORITIES = (0, 1, 2)
PRIORITY_WEIGHTS = (0.6, 0.3, 0.1)
OVERLOAD = 1.5
FIXED_BUDGETS = (32, 64, 128, 256, 512)
BUDGET_REQUESTS = 100
TARGET_FACTORS = (3.0, 5.0)
TINY = dict(num_blocks=160, block_size=16, max_num_seqs=32, max_batch_tokens=512)
SMOL = dict(num_blocks=32, block_size=16, max_num_seqs=16, max_batch_tokens=256)


def _uniform(rng):
    return rng.randint(16, 96), rng.randint(8, 192)


def _long_tailed(rng):
    return rng.randint(16, 96), min(CAP, max(1, round(rng.lognormvariate(math.log(24), 1.0))))


def _bimodal(rng):
    if rng.random() < 0.75:
        return rng.randint(16, 64), rng.randint(8, 40)  # chat
    return rng.randint(160, 320), rng.randint(160, 320)  # a long document, a long answer


WORKLOADS = {"uniform": _uniform, "long_tailed": _long_tailed, "bimodal": _bimodal}


def draw(workload: str, n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, int, int]]:
    """(prompt_len, output_len, priority) of ``n`` requests; ``scale`` shrinks both lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, o = WORKLOADS[workload](rng)
        out.append((max(1, round(p * scale)), max(1, round(o * scale)),
                    rng.choices(PRIORITIES, PRIORITY_WEIGHTS)[0]))
    return out


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Poisson arrival times (seconds from the start) at ``rate`` requests per second."""
    rng, t, out = random.Random(seed + 1), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return out


def _stop_at(total: int):
    return lambda tokens: len(tokens) >= total


def _pct(values, q):
    from ..engine.metrics import percentile

    v = percentile(values, q)
    return None if v is None else 1e3 * v


class _Clock:
    """Seconds since the start: wall time, or (``cpu=True``) this process's CPU time plus the
    idle gaps skipped while waiting for arrivals. On a machine shared with other jobs the CPU
    clock measures the engine alone: with one torch thread it is what a quiet machine's wall
    clock would read."""

    def __init__(self, cpu: bool):
        self.cpu, self.skipped = cpu, 0.0
        self.t0 = time.process_time() if cpu else time.perf_counter()

    def now(self) -> float:
        return (time.process_time() if self.cpu else time.perf_counter()) - self.t0 + self.skipped

    def wait_until(self, t: float) -> None:
        if self.cpu:
            self.skipped += max(0.0, t - self.now())
        else:
            time.sleep(max(0.0, t - self.now()))


def run_one(model, specs, times, config, vocab: int, cap: int = CAP, seed: int = 0, cpu_clock: bool = True) -> dict:
    """Serve ``specs`` arriving at ``times`` on a fresh engine; the measured row. Arrivals,
    TTFT, ITL, waits and throughput are read on ``_Clock(cpu_clock)`` after every step."""
    from transformers import GenerationConfig

    from ..engine import Engine

    rng = random.Random(seed + 2)
    engine = Engine(model, config)
    gc = GenerationConfig(max_new_tokens=cap, do_sample=False, eos_token_id=None, pad_token_id=0)
    reqs, live, i = [], [], 0
    token_times, scheduled, arrived = defaultdict(list), {}, {}
    clock = _Clock(cpu_clock)
    while i < len(specs) or engine.scheduler.has_work():
        while i < len(specs) and times[i] <= clock.now():
            p, o, prio = specs[i]
            rid = engine.add_request([rng.randrange(1, vocab) for _ in range(p)], gc, f"r{i}", priority=prio)
            req = engine.requests[rid]
            req.params.stop_check = _stop_at(p + o)
            reqs.append(req)
            live.append(req)
            arrived[req] = times[i]
            i += 1
        if not engine.scheduler.has_work():
            clock.wait_until(times[i])
            continue
        engine.step()
        t = clock.now()
        for req in live:
            if req not in scheduled and req.first_scheduled_step is not None:
                scheduled[req] = t
            got = token_times[req]
            got.extend([t] * (len(req.tokens) - req.prompt_len - len(got)))
        live = [r for r in live if not r.is_done]
    elapsed = clock.now()
    m = engine.metrics()
    if engine.cache.get_num_free_blocks() != engine.cache.num_blocks:
        raise RuntimeError("blocks left in use after the run")
    # Each request ends at its drawn length, or earlier at the model's own EOS (a real model).
    bad = [r.request_id for r in reqs if r.error or (len(r.generated) != specs[int(r.request_id[1:])][1]
                                                     and r.finish_reason != "eos")]
    if bad:
        raise RuntimeError(f"requests ended wrong: {bad[:5]}")
    generated = sum(len(r.generated) for r in reqs)
    ttft = [token_times[r][0] - arrived[r] for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(token_times[r], token_times[r][1:])]
    waits = defaultdict(float)
    for r in reqs:
        waits[r.priority] = max(waits[r.priority], scheduled[r] - arrived[r])
    row = dict(admission=config.admission, budget="adaptive" if config.target_itl_ms else config.max_batch_tokens,
               target_itl_ms=config.target_itl_ms, clock="cpu" if cpu_clock else "wall", requests=len(reqs),
               preemptions=m["preemptions"], recomputed_tokens=m["recomputed_tokens"],
               output_tok_s=generated / (elapsed - times[0]),
               ttft_p50_ms=_pct(ttft, 0.5), ttft_p99_ms=_pct(ttft, 0.99),
               itl_p50_ms=_pct(itl, 0.5), itl_p99_ms=_pct(itl, 0.99),
               prediction_error=m["length_prediction_error"], deferred=m["admissions_deferred_by_prediction"],
               mean_budget=m["step_budget_mean_tokens"], steps=m["steps"])
    row.update({f"longest_wait_p{p}_s": waits.get(p) for p in PRIORITIES})
    print(f"  {config.admission:>10} budget {row['budget']}: {row['output_tok_s']:.0f} tok/s, "
          f"({row['clock']} clock), "
          f"{row['preemptions']} preemptions, {row['recomputed_tokens']} recomputed, p99 ITL {row['itl_p99_ms']:.1f} ms",
          flush=True)
    return row


def _config(admission: str, sizes: dict, **kw):
    from ..engine import BatchConfig

    return BatchConfig(backend="torch", prefix_caching=False, admission=admission, **{**sizes, **kw})


def capacity(model, specs, sizes, vocab, cap, cpu_clock: bool = True) -> float:
    """Requests per second greedy admission serves with everything queued at once."""
    row = run_one(model, specs, [0.0] * len(specs), _config("greedy", sizes), vocab, cap, cpu_clock=cpu_clock)
    return row["requests"] * row["output_tok_s"] / sum(s[1] for s in specs)


def part_admission(model, workloads, n, sizes, vocab, cap, scale=1.0, label="tiny", repeats=1) -> list[dict]:
    rows = []
    for w in workloads:
        print(f"{label} {w}: {n} requests", flush=True)
        specs = draw(w, n, seed=0, scale=scale)
        times = arrivals(n, OVERLOAD * capacity(model, specs, sizes, vocab, cap))
        for rep in range(repeats):
            for admission in ("greedy", "predictive"):
                row = run_one(model, specs, times, _config(admission, sizes), vocab, cap, seed=rep)
                rows.append(dict(part="admission", model=label, workload=w, repeat=rep, **row))
    return rows


def _decode_step_ms(model, sizes, vocab) -> float:
    """Median step time with only short decodes running (what a step costs without prefill)."""
    from ..engine import Engine

    engine = Engine(model, _config("greedy", sizes))
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)
    rng = random.Random(5)
    for i in range(sizes["max_num_seqs"] // 2):
        engine.add_request([rng.randrange(1, vocab) for _ in range(24)], gc)
    for _ in range(4):
        engine.step()
    samples = []
    for _ in range(24):
        t = time.perf_counter()
        engine.step()
        samples.append(1e3 * (time.perf_counter() - t))
    while engine.scheduler.has_work():
        engine.step()
    samples.sort()
    return samples[len(samples) // 2]


def budget_model(vocab: int):
    """Wider than the admission part's model, so a step's time grows with its tokens well above
    the machine's timing jitter (what a step budget controls)."""
    from ..testing import tiny_llama as build

    return build(vocab=vocab, hidden=256, heads=4, kv_heads=2, layers=4, max_positions=1024)


def part_budget(model, n, sizes, vocab, cap, admission="predictive") -> list[dict]:
    specs = draw("bimodal", n, seed=3)
    times = arrivals(n, OVERLOAD * capacity(model, specs, sizes, vocab, cap, cpu_clock=False), seed=3)
    step_ms = _decode_step_ms(model, sizes, vocab)
    rows = []
    for b in FIXED_BUDGETS:
        row = run_one(model, specs, times, _config(admission, {**sizes, "max_batch_tokens": b}), vocab, cap,
                      cpu_clock=False)
        rows.append(dict(part="budget", model="tiny-wide", workload="bimodal", repeat=0, **row))
        rows[-1]["decode_step_ms"] = step_ms
    for factor in TARGET_FACTORS:
        target = round(factor * step_ms, 2)
        row = run_one(model, specs, times, _config(admission, sizes, target_itl_ms=target), vocab, cap, cpu_clock=False)
        rows.append(dict(part="budget", model="tiny-wide", workload="bimodal", repeat=0, **row, goal_itl_ms=target,
                         decode_step_ms=step_ms))
    return rows


COLUMNS = ["part", "model", "workload", "admission", "budget", "clock", "preemptions", "recomputed_tokens",
           "output_tok_s",
           "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "prediction_error", "deferred", "mean_budget",
           "longest_wait_p0_s", "longest_wait_p1_s", "longest_wait_p2_s"]


def run_schedule(out_dir=None, *, requests: int = 200, smollm2: bool = True, quick: bool = False,
                 repeats: int = 4) -> list[dict]:
    import torch

    from .workloads import tiny_llama

    torch.set_num_threads(1)
    vocab = 512
    model = tiny_llama(vocab=vocab)
    n = 48 if quick else requests
    rows = part_admission(model, list(WORKLOADS), n, TINY, vocab, CAP, repeats=1 if quick else repeats)
    rows += part_budget(budget_model(vocab), 24 if quick else BUDGET_REQUESTS, TINY, vocab, CAP)
    report("schedule", rows, COLUMNS, out_dir)  # written now too: the SmolLM2 part takes long
    if smollm2 and not quick:
        from ..models import load_for_device

        smol, _, _ = load_for_device(None, "cpu")
        rows += part_admission(smol, ["bimodal"], 24, SMOL, smol.config.vocab_size, 96, scale=0.3, label="smollm2")
    path = report("schedule", rows, COLUMNS, out_dir)
    print()
    report("schedule-summary", summarize(rows), SUMMARY_COLUMNS, out_dir)
    _plot(rows, path.with_suffix(".png"))
    return rows


SUMMARY_COLUMNS = ["model", "workload", "repeats", "recomputed_greedy", "recomputed_predictive", "recomputed_cut",
                   "throughput_ratio", "prediction_error", "longest_wait_s"]


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def summarize(rows) -> list[dict]:
    """Per model and workload, over the repeats: medians of the recomputed tokens and of the
    predictive / greedy throughput ratios of the runs made back to back."""
    out = []
    groups = sorted({(r["model"], r["workload"]) for r in rows if r["part"] == "admission"})
    for model, w in groups:
        runs = [r for r in rows if r["part"] == "admission" and r["model"] == model and r["workload"] == w]
        pairs = [(g, p) for g in runs for p in runs if g["repeat"] == p["repeat"]
                 and g["admission"] == "greedy" and p["admission"] == "predictive"]
        rec_g = _median([g["recomputed_tokens"] for g, _ in pairs])
        rec_p = _median([p["recomputed_tokens"] for _, p in pairs])
        out.append(dict(model=model, workload=w, repeats=len(pairs), recomputed_greedy=rec_g, recomputed_predictive=rec_p,
                        recomputed_cut=1 - rec_p / rec_g if rec_g else None,
                        throughput_ratio=_median([p["output_tok_s"] / g["output_tok_s"] for g, p in pairs]),
                        prediction_error=_median([p["prediction_error"] for _, p in pairs]),
                        longest_wait_s=max(max(r[f"longest_wait_p{k}_s"] or 0 for k in PRIORITIES) for r in runs)))
    return out


def _plot(rows, png) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    adm = [r for r in rows if r["part"] == "admission" and r["model"] == "tiny"]
    labels = sorted({r["workload"] for r in adm})
    for k, mode in enumerate(("greedy", "predictive")):
        rec = [sum(r["recomputed_tokens"] for r in adm if r["workload"] == w and r["admission"] == mode) for w in labels]
        tps = [sum(r["output_tok_s"] for r in adm if r["workload"] == w and r["admission"] == mode) for w in labels]
        cnt = [max(1, sum(1 for r in adm if r["workload"] == w and r["admission"] == mode)) for w in labels]
        xs = [i + 0.4 * k for i in range(len(labels))]
        a1.bar(xs, [x / c for x, c in zip(rec, cnt)], width=0.4, label=mode)
        a2.bar(xs, [x / c for x, c in zip(tps, cnt)], width=0.4, label=mode)
    for ax, title in ((a1, "recomputed tokens"), (a2, "output tokens/s")):
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels)
        ax.set_title(title)
        ax.legend()
    bud = [r for r in rows if r["part"] == "budget"]
    for r in bud:
        a3.scatter(r["output_tok_s"], r["itl_p99_ms"], color="C1" if r["budget"] == "adaptive" else "C0")
        label = r["budget"] if r["budget"] != "adaptive" else f"adaptive {r['target_itl_ms']}"
        a3.annotate(str(label), (r["output_tok_s"], r["itl_p99_ms"]))
    for k, r in enumerate(r for r in bud if r.get("goal_itl_ms")):
        a3.axhline(r["goal_itl_ms"], color=f"C{k + 2}", linestyle="--", label=f"target_itl_ms {r['goal_itl_ms']}")
    if bud:
        a3.legend()
    a3.set_xlabel("output tokens/s")
    a3.set_ylabel("p99 ITL, ms")
    a3.set_title("fixed budgets vs target_itl_ms (bimodal)")
    fig.suptitle(f"adaptive scheduling ({device_name()})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")

"""The runs behind ``cbkernels bench schedule`` (``schedule.py``, ``schedule_budget.py``): the
workloads, Poisson arrivals, and one engine serving them a step at a time
(``_Run``), alone (``run_one``) or alternating with other engines on the same workload
(``run_group``, ``run_pair``)."""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict

# name -> (number of requests, draw(rng) -> (prompt_len, output_len))
CAP = 384  # max_new_tokens of every request
PRIORITIES = (0, 1, 2)
PRIORITY_WEIGHTS = (0.6, 0.3, 0.1)


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


def _warm_up(engine, warmup, gc, vocab: int, rng) -> None:
    """Serve ``warmup`` (all queued at once) to the end: the length model learns from them."""
    for k, (p, o, prio) in enumerate(warmup):
        rid = engine.add_request([rng.randrange(1, vocab) for _ in range(p)], gc, f"w{k}", priority=prio)
        engine.requests[rid].params.stop_check = _stop_at(p + o)
    while engine.scheduler.has_work():
        engine.step()


class _Run:
    """One engine serving ``specs`` arriving at ``times``, a step at a time (``advance``).

    ``clock="cpu"``: ``times`` count engine steps (request i is added before the first step
    numbered ``>= times[i]``), so every run of a workload sees the same arrivals step by step
    whatever the machine did meanwhile, and the clock is the process CPU time spent in this
    run's own ``advance`` calls: runs advanced alternately (``run_group``) are timed on the
    same machine state, and none is charged for another. ``clock="busy"``: the same step-clock
    arrivals, but latencies (TTFT, ITL) on the wall clock counted only inside this run's own
    ``advance`` calls (what the engine's step-time model sees: ``target_itl_ms`` controls
    wall time), throughput still over the CPU time. ``clock="wall"``: ``times`` are seconds
    and everything is on the wall clock. ``warmup`` (specs) are served first, unmeasured."""

    def __init__(self, model, specs, times, config, vocab, cap, seed=0, clock="cpu", warmup=()):
        from transformers import GenerationConfig

        from ..engine import Engine

        if clock not in ("cpu", "busy", "wall"):
            raise ValueError(f"clock must be 'cpu', 'busy' or 'wall', got {clock!r}")
        self.specs, self.times, self.config, self.vocab, self.clock = specs, times, config, vocab, clock
        self.cpu = clock != "wall"  # arrivals on the step clock
        self.rng = random.Random(seed + 2)
        self.engine = Engine(model, config)
        self.gc = GenerationConfig(max_new_tokens=cap, do_sample=False, eos_token_id=None, pad_token_id=0)
        _warm_up(self.engine, warmup, self.gc, vocab, self.rng)
        self.m0 = self.engine.metrics()
        self.reqs, self.live, self.i, self.steps, self.spent, self.busy = [], [], 0, 0, 0.0, 0.0
        self.token_times, self.scheduled, self.arrived = defaultdict(list), {}, {}
        self.t0 = time.perf_counter()

    def now(self) -> float:
        if self.clock == "wall":
            return time.perf_counter() - self.t0
        return self.spent if self.clock == "cpu" else self.busy

    @property
    def done(self) -> bool:
        return self.i >= len(self.specs) and not self.engine.scheduler.has_work()

    def advance(self) -> None:
        """Add what has arrived, then one engine step (or wait for the next arrival)."""
        start, wall, engine, specs = time.process_time(), time.perf_counter(), self.engine, self.specs
        while self.i < len(specs) and self.times[self.i] <= (self.steps if self.cpu else self.now()):
            p, o, prio = specs[self.i]
            rid = engine.add_request([self.rng.randrange(1, self.vocab) for _ in range(p)], self.gc, f"r{self.i}",
                                     priority=prio)
            req = engine.requests[rid]
            req.params.stop_check = _stop_at(p + o)
            self.reqs.append(req)
            self.live.append(req)
            self.arrived[req] = self.now() if self.cpu else self.times[self.i]
            self.i += 1
        if not engine.scheduler.has_work():
            if self.i < len(specs):  # idle until the next arrival
                if self.cpu:
                    self.steps = math.ceil(self.times[self.i])
                else:
                    time.sleep(max(0.0, self.times[self.i] - self.now()))
            return
        engine.step()
        self.steps += 1
        self.spent += time.process_time() - start
        self.busy += time.perf_counter() - wall
        t = self.now()
        for req in self.live:
            if req not in self.scheduled and req.first_scheduled_step is not None:
                self.scheduled[req] = t
            got = self.token_times[req]
            got.extend([t] * (len(req.tokens) - req.prompt_len - len(got)))
        self.live = [r for r in self.live if not r.is_done]

    def row(self) -> dict:
        engine, reqs, config = self.engine, self.reqs, self.config
        elapsed = self.spent if self.cpu else self.now() - self.times[0]
        m = engine.metrics()
        if engine.cache.get_num_free_blocks() != engine.cache.num_blocks:
            raise RuntimeError("blocks left in use after the run")
        # Each request ends at its drawn length, or earlier at the model's own EOS (a real model).
        bad = [r.request_id for r in reqs if r.error or (len(r.generated) != self.specs[int(r.request_id[1:])][1]
                                                         and r.finish_reason != "eos")]
        if bad:
            raise RuntimeError(f"requests ended wrong: {bad[:5]}")
        for key in ("preemptions", "recomputed_tokens", "admissions_deferred_by_prediction", "steps"):
            m[key] -= self.m0[key]  # the measured phase only
        scored = [abs(r.predicted_output - len(r.generated)) / len(r.generated) for r in reqs
                  if r.predicted_output is not None and r.generated]
        tt = self.token_times
        ttft = [tt[r][0] - self.arrived[r] for r in reqs]
        itl = [b - a for r in reqs for a, b in zip(tt[r], tt[r][1:])]
        waits = defaultdict(float)
        for r in reqs:
            waits[r.priority] = max(waits[r.priority], self.scheduled[r] - self.arrived[r])
        row = dict(admission=config.admission,
                   budget="adaptive" if config.target_itl_ms else config.max_batch_tokens,
                   target_itl_ms=config.target_itl_ms, clock=self.clock, requests=len(reqs),
                   preemptions=m["preemptions"], recomputed_tokens=m["recomputed_tokens"],
                   output_tok_s=sum(len(r.generated) for r in reqs) / elapsed,
                   ttft_p50_ms=_pct(ttft, 0.5), ttft_p99_ms=_pct(ttft, 0.99),
                   itl_p50_ms=_pct(itl, 0.5), itl_p99_ms=_pct(itl, 0.99),
                   prediction_error=sum(scored) / len(scored) if scored else None,
                   deferred=m["admissions_deferred_by_prediction"], mean_budget=m["step_budget_mean_tokens"],
                   steps=m["steps"], cpu_s=self.spent, busy_s=self.busy)
        row.update({f"longest_wait_p{p}_s": waits.get(p) for p in PRIORITIES})
        print(f"  {config.admission:>10} budget {row['budget']}: {row['output_tok_s']:.0f} tok/s "
              f"({row['clock']} clock), {row['steps']} steps, {row['preemptions']} preemptions, "
              f"{row['recomputed_tokens']} recomputed, p99 ITL {row['itl_p99_ms']:.1f} ms", flush=True)
        return row


def run_one(model, specs, times, config, vocab: int, cap: int = CAP, seed: int = 0, clock: str = "cpu",
            warmup=()) -> dict:
    """Serve ``specs`` arriving at ``times`` on a fresh engine (``_Run``); the measured row."""
    run = _Run(model, specs, times, config, vocab, cap, seed, clock, warmup)
    while not run.done:
        run.advance()
    return run.row()


def run_group(model, specs, times, configs, vocab: int, cap: int = CAP, seed: int = 0, warmup=(),
              clock: str = "cpu") -> list[dict]:
    """Serve the same workload on one engine per config, advanced in turn a step each, the
    order reversed every round (a step-clock ``clock``): slow and fast moments of a shared
    machine fall on every run alike, so their throughputs and latencies compare fairly."""
    if clock == "wall":
        raise ValueError("run_group needs arrivals on the step clock: clock 'cpu' or 'busy'")
    runs = [_Run(model, specs, times, c, vocab, cap, seed, clock, warmup) for c in configs]
    k = 0
    while not all(r.done for r in runs):
        for r in (runs if k % 2 == 0 else runs[::-1]):
            if not r.done:
                r.advance()
        k += 1
    return [r.row() for r in runs]


def run_pair(model, specs, times, configs, vocab: int, cap: int = CAP, seed: int = 0, warmup=()) -> list[dict]:
    """Two engines (greedy and predictive admission) alternating step by step, CPU clock."""
    return run_group(model, specs, times, configs, vocab, cap, seed, warmup)


def _config(admission: str, sizes: dict, **kw):
    from ..engine import BatchConfig

    return BatchConfig(backend="torch", prefix_caching=False, admission=admission, **{**sizes, **kw})


def capacity(model, specs, sizes, vocab, cap, cpu_clock: bool = True) -> float:
    """Requests greedy admission serves per step (``cpu_clock``: the arrival clock counts
    steps; deterministic) or per wall second, with everything queued at once."""
    row = run_one(model, specs, [0.0] * len(specs), _config("greedy", sizes), vocab, cap,
                  clock="cpu" if cpu_clock else "wall")
    if cpu_clock:
        return row["requests"] / row["steps"]
    return row["requests"] * row["output_tok_s"] / sum(s[1] for s in specs)



"""Soak test: thousands of requests with random lengths against a deliberately small cache on
a tiny random-weight Llama (CPU), prefix caching on, with hostile requests, cancellations and
injected forward faults mixed in, in ``--priorities`` priority classes. Checks that every
request completes or fails with a reason (none lost, none duplicated), that no cache block
leaks, how long the longest wait was (overall and per priority: aging means none starves),
and how much resident memory grew after warm-up.

    python bench/soak.py --requests 3000 --scheduler fifo --seed 0
Writes bench/results/soak-<scheduler>-<date>.json (summary) and .csv (one row per request).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import pathlib
import platform
import random
import re
import time
from collections import Counter

import numpy as np
import torch
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine, RequestStatus as S
from cbkernels.benchmarks.workloads import tiny_llama

RESULTS = pathlib.Path(__file__).parent / "results"
VOCAB = 512
# Small on purpose: 40 blocks of 8 tokens hold ~3 long requests, so the scheduler waits,
# preempts and splits prefills all the time.
NUM_BLOCKS, BLOCK_SIZE, MAX_BATCH_TOKENS, MAX_NUM_SEQS = 40, 8, 48, 12
MAX_PROMPT, MAX_NEW = 96, 24
SYSTEM_PROMPT_LEN, SHARED_FRACTION = 24, 0.3  # a shared prefix exercises the prefix cache
HOSTILE_FRACTION, CANCEL_FRACTION, FAULT_RATE = 0.03, 0.02, 0.002
WARMUP_FRACTION = 0.1  # RSS is read once this share of requests has finished
SPOT_CHECKS = 24  # finished requests re-run alone on a fresh engine: tokens must match
SPOT_POOL = 200  # finished requests kept (tokens only) to draw the spot checks from
MAX_STEPS_PER_REQUEST = 200  # a hang guard: far above what any request needs


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gc(max_new: int) -> GenerationConfig:
    gc = GenerationConfig(max_new_tokens=1, pad_token_id=0, eos_token_id=None, do_sample=False)
    gc.max_new_tokens = max_new  # past GenerationConfig's own checks: hostile values reach the engine
    return gc


def make_requests(n: int, rng: random.Random) -> list[tuple[list[int], int, str]]:
    """(prompt, max_new_tokens, kind) with kind 'ok' or the hostile problem it carries."""
    system = [rng.randrange(1, VOCAB) for _ in range(SYSTEM_PROMPT_LEN)]
    out = []
    for _ in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, MAX_PROMPT))]
        if rng.random() < SHARED_FRACTION:
            prompt = system + prompt[:MAX_PROMPT - SYSTEM_PROMPT_LEN]
        max_new, kind = rng.randint(1, MAX_NEW), "ok"
        if rng.random() < HOSTILE_FRACTION:
            kind = rng.choice(["empty", "oov", "past_cache", "max_new_0"])
            prompt = {"empty": [], "oov": prompt + [VOCAB + 7],
                      "past_cache": [1] * (NUM_BLOCKS * BLOCK_SIZE + 1)}.get(kind, prompt)
            max_new = 0 if kind == "max_new_0" else max_new
        out.append((prompt, max_new, kind))
    return out


class FaultInjector:
    """Makes the model's forward raise with probability ``rate`` (a transient fault)."""

    def __init__(self, model, rate: float, rng: random.Random):
        self.model, self.rate, self.rng, self.count = model, rate, rng, 0
        self.original = model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        if self.rng.random() < self.rate:
            self.count += 1
            raise RuntimeError("injected soak fault")
        return self.original(*args, **kwargs)

    def remove(self):
        self.model.forward = self.original


def _reason_kind(text: str) -> str:
    return re.sub(r"\d+", "N", text)[:90]


class RowStore:
    """Per-request results in arrays allocated (and touched) before the run, so the harness's
    own bookkeeping does not grow resident memory while the engine is measured; the rows
    are assembled as dicts only after the last RSS reading."""

    INT_FIELDS = ("prompt_len", "max_new_tokens", "generated", "priority", "arrival_step", "first_scheduled_step",
                  "preemptions", "prefix_hit_tokens", "kind", "status", "finish_reason", "error")
    FLOAT_FIELDS = ("wait_s", "ttft_s")

    def __init__(self, n: int):
        self.ints = {f: np.full(n, -1, dtype=np.int64) for f in self.INT_FIELDS}
        self.floats = {f: np.full(n, np.nan) for f in self.FLOAT_FIELDS}
        self.codes: dict[str, dict] = {f: {} for f in ("kind", "status", "finish_reason", "error")}
        self.filled = np.zeros(n, dtype=bool)

    def _code(self, field: str, value) -> int:
        if value is None:
            return -1
        table = self.codes[field]
        return table.setdefault(value, len(table))

    def record(self, i: int, r, kind: str) -> None:
        out = r.to_output()
        values = dict(prompt_len=r.prompt_len, max_new_tokens=r.params.max_new_tokens, generated=len(r.generated),
                      priority=r.priority,
                      arrival_step=r.arrival_step, preemptions=r.num_preemptions, prefix_hit_tokens=r.prefix_hit_tokens,
                      first_scheduled_step=-1 if r.first_scheduled_step is None else r.first_scheduled_step,
                      kind=self._code("kind", kind), status=self._code("status", r.status.value),
                      finish_reason=self._code("finish_reason", r.finish_reason), error=self._code("error", r.error))
        for field, value in values.items():
            self.ints[field][i] = value
        if r.first_scheduled_time is not None:
            self.floats["wait_s"][i] = r.first_scheduled_time - r.arrival_time
        if out.ttft_s is not None:
            self.floats["ttft_s"][i] = out.ttft_s
        self.filled[i] = True

    def rows(self) -> list[dict]:
        names = {f: {v: k for k, v in table.items()} for f, table in self.codes.items()}
        rows = []
        for i in np.flatnonzero(self.filled):
            row = {"request_id": f"s{i}"}
            for field in self.INT_FIELDS:
                value = int(self.ints[field][i])
                row[field] = names[field].get(value) if field in names else value
            first = row["first_scheduled_step"]
            row["first_scheduled_step"] = None if first < 0 else first
            row["wait_steps"] = None if first < 0 else first - row["arrival_step"]
            for field in self.FLOAT_FIELDS:
                value = float(self.floats[field][i])
                row[field] = None if np.isnan(value) else value
            rows.append(row)
        return rows


def run_soak(num_requests: int, seed: int = 0, scheduler: str = "fifo", *, fault_rate: float = FAULT_RATE,
             spot_checks: int = SPOT_CHECKS, progress: bool = True,
             async_scheduling: bool = False, priorities: int = 3,
             admission: str = "greedy") -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    prio_rng = random.Random(seed + 3)  # its own stream: the requests are those of a 1-priority run
    model = tiny_llama(vocab=VOCAB, seed=seed)
    config = BatchConfig(backend="torch", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                         max_batch_tokens=MAX_BATCH_TOKENS, max_num_seqs=MAX_NUM_SEQS, scheduler=scheduler,
                         prefix_caching=True, async_scheduling=async_scheduling, admission=admission)
    engine = Engine(model, config)
    specs = make_requests(num_requests, rng)
    faults = FaultInjector(model, fault_rate, random.Random(seed + 1))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_requests, desc=f"soak {scheduler}", unit="req")
    # Everything per request lives in preallocated arrays (RowStore) or shrinks as requests
    # finish (live, kinds): the harness itself does not grow while memory is measured.
    added, kinds, cancel_targets, live, store = 0, {}, set(), set(), RowStore(num_requests)
    handed_over = peak_live = 0
    spot_pool = []  # (prompt, max_new, generated) of finished requests: re-run alone afterwards
    rss_warm, max_steps = None, MAX_STEPS_PER_REQUEST * num_requests
    next_spec = 0
    start = time.perf_counter()
    while next_spec < len(specs) or engine.scheduler.has_work():
        for _ in range(rng.randint(0, 3)):  # bursty arrivals, 1.5 per step on average
            if next_spec < len(specs):
                prompt, max_new, kind = specs[next_spec]
                rid = engine.add_request(prompt, _gc(max_new), request_id=f"s{next_spec}",
                                         priority=prio_rng.randrange(priorities))
                added += 1
                live.add(rid)
                kinds[rid] = kind
                if kind == "ok" and rng.random() < CANCEL_FRACTION:
                    cancel_targets.add(rid)
                next_spec += 1
        for rid in list(cancel_targets):
            if engine.requests[rid].generated or engine.requests[rid].is_done:  # cancel once it runs
                engine.cancel(rid)
                cancel_targets.discard(rid)
        engine.step()
        peak_live = max(peak_live, len(live))
        # Hand finished requests over as a server would (pop_result), so the engine holds only
        # live ones and resident memory measures the engine, not an archive of results.
        for rid in [r for r in live if engine.requests[r].is_done and r not in cancel_targets]:
            req = engine.requests[rid]
            store.record(int(rid[1:]), req, kinds.pop(rid))
            handed_over += 1
            if req.finish_reason == "length" and len(spot_pool) < SPOT_POOL:
                spot_pool.append((req.tokens[:req.prompt_len], req.params.max_new_tokens, list(req.generated)))
            engine.pop_result(rid)
            live.discard(rid)
        if bar is not None:
            bar.update(handed_over - bar.n)
        if rss_warm is None and handed_over >= WARMUP_FRACTION * num_requests:
            rss_warm = rss_bytes()
        if engine.num_steps > max_steps:
            raise RuntimeError(f"soak hung: {engine.num_steps} steps")
    wall = time.perf_counter() - start
    rss_end = rss_bytes()
    for rid in live:  # anything not handed over above (done, or lost: "lost" counts it)
        store.record(int(rid[1:]), engine.requests[rid], kinds[rid])
    rows = store.rows()
    faults.remove()
    if bar is not None:
        bar.close()
    # Spot check: finished requests re-run alone on a fresh, roomy engine give the same tokens.
    checked = random.Random(seed + 2).sample(spot_pool, min(spot_checks, len(spot_pool)))
    fresh = Engine(model, BatchConfig(backend="torch"))
    mismatches = sum(fresh.generate([prompt], _gc(max_new))[0].generated_tokens != generated
                     for prompt, max_new, generated in checked)
    # Starvation: how many later arrivals of the same priority got scheduled before a request
    # (FIFO within a priority keeps this ~0; overload alone makes waits long but never lets a
    # request be overtaken indefinitely). Across priorities aging bounds the wait.
    overtaken = []
    for prio in range(priorities):
        order = sorted((r["arrival_step"], i, r["first_scheduled_step"]) for i, r in enumerate(rows)
                       if r["wait_steps"] is not None and r["priority"] == prio)
        overtaken += [sum(1 for _, _, later in order[k + 1:] if later < first) for k, (_, _, first) in enumerate(order)]
    by_prio = {f"priority {p}": max((r["wait_steps"] for r in rows if r["wait_steps"] is not None
                                     and r["priority"] == p), default=None) for p in range(priorities)}
    by_prio = {k: v for k, v in by_prio.items() if v is not None}
    statuses = Counter(r["status"] for r in rows)
    failures = Counter(_reason_kind(r["error"]) for r in rows if r["status"] == S.FAILED.value)
    waits = [r for r in rows if r["wait_steps"] is not None]
    longest = max(waits, key=lambda r: r["wait_steps"]) if waits else None
    leaked = engine.cache.num_blocks - engine.cache.get_num_free_blocks()
    tables_left = sum(len(a.tables) for a in engine.cache.allocators)
    summary = dict(
        date=dt.datetime.now().isoformat(timespec="seconds"), scheduler=scheduler, seed=seed, requests=num_requests,
        machine=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
        num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_batch_tokens=MAX_BATCH_TOKENS, max_num_seqs=MAX_NUM_SEQS,
        steps=engine.num_steps, wall_s=round(wall, 2),
        finished=statuses.get(S.FINISHED.value, 0), failed=statuses.get(S.FAILED.value, 0),
        cancelled=sum(r["finish_reason"] == "cancelled" for r in rows),
        failures_by_reason=dict(failures), failures_without_reason=sum(
            1 for r in rows if r["status"] == S.FAILED.value and not r["error"]),
        hostile_not_failed=sum(1 for r in rows if r["kind"] != "ok" and r["status"] != S.FAILED.value),
        injected_faults=faults.count,
        lost=num_requests - sum(1 for r in rows if r["status"] in (S.FINISHED.value, S.FAILED.value)),
        # A reused request id raises in add_request; a request with more tokens than asked is a duplicate.
        duplicated=(added - num_requests) + sum(1 for r in rows if r["generated"] > max(r["max_new_tokens"], 0)),
        leaked_blocks=leaked, allocator_tables_left=tables_left,
        preemptions=sum(r["preemptions"] for r in rows),
        prefix_hit_rate=round(engine.cache.prefix_hit_rate(), 4),
        longest_wait_steps=longest["wait_steps"] if longest else None,
        longest_wait_s=round(max(r["wait_s"] for r in waits), 4) if waits else None,
        priorities=priorities, admission=admission, longest_wait_steps_by_priority=by_prio,
        max_overtaken=max(overtaken, default=0),
        longest_ttft_s=round(max((r["ttft_s"] for r in rows if r["ttft_s"] is not None), default=0.0), 4),
        rss_warm_mib=round((rss_warm or rss_end) / 2**20, 1), rss_end_mib=round(rss_end / 2**20, 1),
        rss_growth_mib=round((rss_end - (rss_warm or rss_end)) / 2**20, 1),
        # Overload queues requests (prompt tokens and state held until served): the RSS high-water mark.
        peak_live_requests=peak_live,
        spot_checked=len(checked), spot_mismatches=mismatches,
    )
    return summary, rows


def print_table(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}")
            for reason, count in sorted(value.items(), key=lambda kv: -kv[1]):
                print(f"  {count:>6}  {reason}")
        else:
            print(f"{key:<{width}}  {value}")


def write_results(summary: dict, rows: list[dict], out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"soak-{summary['scheduler']}-{summary['requests']}-{summary['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=["fifo", "prefill_first", "both"], default="both")
    parser.add_argument("--fault-rate", type=float, default=FAULT_RATE)
    parser.add_argument("--async-scheduling", action="store_true",
                        help="overlap host and device work (read tokens back one step later)")
    parser.add_argument("--priorities", type=int, default=3, help="priority classes (0 .. N-1, drawn uniformly)")
    parser.add_argument("--admission", choices=["greedy", "predictive"], default="greedy")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.priorities < 1:
        parser.error(f"--priorities must be >= 1, got {args.priorities}")
    torch.set_num_threads(1)
    bad = 0
    for scheduler in (["fifo", "prefill_first"] if args.scheduler == "both" else [args.scheduler]):
        summary, rows = run_soak(args.requests, args.seed, scheduler, fault_rate=args.fault_rate,
                                 async_scheduling=args.async_scheduling, priorities=args.priorities,
                                 admission=args.admission)
        print_table(summary)
        print("wrote", write_results(summary, rows, args.out))
        bad += summary["lost"] + summary["duplicated"] + summary["leaked_blocks"] + summary["failures_without_reason"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

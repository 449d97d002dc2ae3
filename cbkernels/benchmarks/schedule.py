"""Adaptive scheduling: greedy against predictive admission, fixed against adaptive step budget.

Three workloads of output lengths (``WORKLOADS``): uniform, long-tailed (log-normal) and
bimodal (chat answers beside long documents: long prompts, long outputs); every request
may generate up to the same ``max_new_tokens`` cap, so only what the engine learns tells
them apart. Each request ends at its drawn length through its stop check (as a stop string
would end it), so the scheduler does not know the length in advance. Requests arrive as a
Poisson process at ``OVERLOAD`` times the rate greedy admission serves them (measured first
on the same workload, all requests at once), in three priority classes; the cache is small
enough that greedy admission preempts. Part 1 keeps time on the process's CPU clock: on a
shared machine that is what compares runs, the wall clock moves with whatever else runs.

Part 1 (``admission``): per workload, greedy vs predictive: preemptions, recomputed tokens,
output tokens/s, TTFT and ITL p50/p99, the length model's error, longest wait per priority.
Part 2 (``budget``, ``schedule_budget.py``): fixed step budgets against ``target_itl_ms``
on a wider random Llama, all settings side by side on bursty arrivals: p99 ITL against
throughput (its own CSV, summary and PNG, ``schedule-budget-*``). The embedded SmolLM2 runs
a short part 1 on the bimodal workload; the tiny random Llama (CPU-fast) runs everything.
"""
from __future__ import annotations

from .common import device_name, pyplot, report
from .schedule_budget import _median, run_budget
from .schedule_runs import CAP, PRIORITIES, WORKLOADS, _config, arrivals, capacity, draw, run_pair

OVERLOAD = 1.5
WARMUP = 64  # requests served before the measured ones (both admission modes)
TINY = dict(num_blocks=160, block_size=16, max_num_seqs=32, max_batch_tokens=512)
SMOL = dict(num_blocks=32, block_size=16, max_num_seqs=16, max_batch_tokens=256)
SMOL_PAIRS, SMOL_WARMUP = 3, 16  # SmolLM2 steps take ~0.1-0.4 s on this CPU


def part_admission(model, workloads, n, sizes, vocab, cap, scale=1.0, label="tiny", repeats=1,
                   warmup: int = WARMUP) -> list[dict]:
    """Per workload: ``repeats`` interleaved greedy/predictive pairs (``run_pair``), each engine
    first served ``warmup`` requests of the same workload (other draws), unmeasured."""
    rows = []
    for w in workloads:
        print(f"{label} {w}: {n} requests after {warmup} warm-up requests", flush=True)
        specs, warm = draw(w, n, seed=0, scale=scale), draw(w, warmup, seed=100, scale=scale)
        times = arrivals(n, OVERLOAD * capacity(model, specs, sizes, vocab, cap))
        for rep in range(repeats):
            modes = ("greedy", "predictive") if rep % 2 == 0 else ("predictive", "greedy")
            for row in run_pair(model, specs, times, [_config(m, sizes) for m in modes], vocab, cap, rep, warm):
                rows.append(dict(part="admission", model=label, workload=w, repeat=rep, **row))
    return rows


COLUMNS = ["part", "model", "workload", "repeat", "admission", "budget", "target_itl_ms", "clock", "steps",
           "preemptions", "recomputed_tokens",
           "output_tok_s",
           "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "prediction_error", "deferred", "mean_budget",
           "longest_wait_p0_s", "longest_wait_p1_s", "longest_wait_p2_s"]


def run_schedule(out_dir=None, *, requests: int = 200, smollm2: bool = True, quick: bool = False,
                 repeats: int = 10, rounds: int = 3) -> list[dict]:
    import torch

    from .workloads import tiny_llama

    torch.set_num_threads(1)
    vocab = 512
    model = tiny_llama(vocab=vocab)
    n = 48 if quick else requests
    rows = part_admission(model, list(WORKLOADS), n, TINY, vocab, CAP, repeats=1 if quick else repeats)
    report("schedule", rows, COLUMNS, out_dir)  # written now too: the SmolLM2 part takes long
    if smollm2 and not quick:
        from ..models import load_for_device

        smol, _, _ = load_for_device(None, "cpu")
        rows += part_admission(smol, ["bimodal"], 24, SMOL, smol.config.vocab_size, 96, scale=0.3, label="smollm2",
                               repeats=SMOL_PAIRS, warmup=SMOL_WARMUP)
    path = report("schedule", rows, COLUMNS, out_dir)
    print()
    report("schedule-summary", summarize(rows), SUMMARY_COLUMNS, out_dir)
    _plot(rows, path.with_suffix(".png"))
    print()
    return rows + run_budget(out_dir, quick=quick, rounds=rounds)


SUMMARY_COLUMNS = ["model", "workload", "repeats", "recomputed_greedy", "recomputed_predictive", "recomputed_cut",
                   "throughput_ratio", "ratio_q1", "ratio_q3", "ratio_min", "ratio_max", "pairs_at_least_097",
                   "steps_greedy", "steps_predictive", "prediction_error", "longest_wait_s"]


def summarize(rows) -> list[dict]:
    """Per model and workload, over the pairs (``run_pair``): medians of the recomputed tokens,
    of the engine steps and of the predictive / greedy throughput ratio, with the ratio's
    quartiles (of the lower and upper halves), extremes, and how many pairs reached 0.97."""
    out = []
    groups = sorted({(r["model"], r["workload"]) for r in rows if r["part"] == "admission"})
    for model, w in groups:
        runs = [r for r in rows if r["part"] == "admission" and r["model"] == model and r["workload"] == w]
        pairs = [(g, p) for g in runs for p in runs if g["repeat"] == p["repeat"]
                 and g["admission"] == "greedy" and p["admission"] == "predictive"]
        rec_g = _median([g["recomputed_tokens"] for g, _ in pairs])
        rec_p = _median([p["recomputed_tokens"] for _, p in pairs])
        ratios = sorted(p["output_tok_s"] / g["output_tok_s"] for g, p in pairs)
        out.append(dict(model=model, workload=w, repeats=len(pairs), recomputed_greedy=rec_g, recomputed_predictive=rec_p,
                        recomputed_cut=1 - rec_p / rec_g if rec_g else None, throughput_ratio=_median(ratios),
                        ratio_q1=_median(ratios[:len(ratios) // 2]) if len(ratios) > 1 else ratios[0],
                        ratio_q3=_median(ratios[(len(ratios) + 1) // 2:]) if len(ratios) > 1 else ratios[0],
                        ratio_min=ratios[0], ratio_max=ratios[-1], pairs_at_least_097=sum(x >= 0.97 for x in ratios),
                        steps_greedy=_median([g["steps"] for g, _ in pairs]),
                        steps_predictive=_median([p["steps"] for _, p in pairs]),
                        prediction_error=_median([p["prediction_error"] for _, p in pairs]),
                        longest_wait_s=max(max(r[f"longest_wait_p{k}_s"] or 0 for k in PRIORITIES) for r in runs)))
    return out


def _plot(rows, png) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
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
    fig.suptitle(f"adaptive scheduling ({device_name()})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")

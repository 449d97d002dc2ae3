"""Throughput against latency: the same prompts at rising concurrency and step budgets.

More requests per step raise tokens/s (the weights are read once for all of them) and
lengthen each step, hence the time between tokens: the curve shows where that trade sits.
"""
from __future__ import annotations

import statistics

from .common import print_table, pyplot, result_path, write_csv
from .workloads import run_engine

CONCURRENCY = [1, 2, 4, 8, 16]
BATCH_TOKENS = [32, 64, 128, 256, 1024]
# Concurrency held while the step budget varies: every prompt can run at once.
SWEEP_MAX_SEQS = 16


def _row(knob: str, value: int, run) -> dict:
    ok = [o for o in run.outputs if o.error is None]
    itl = [x for o in ok for x in o.itl_s]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    return {"knob": knob, "value": value, "tokens_per_s": f"{run.tokens_per_s:.1f}",
            "itl_mean_ms": f"{1e3 * statistics.fmean(itl):.1f}" if itl else "",
            "ttft_p50_ms": f"{1e3 * statistics.median(ttft):.0f}" if ttft else "",
            "wall_s": f"{run.wall_s:.2f}", "generated": run.generated}


def run_sweep(model, prompts, generation_config, *, block_size=16, out_dir=None, progress=True) -> list[dict]:
    from tqdm import tqdm

    from ..engine.config import BatchConfig

    longest = max(len(p) for p in prompts) + generation_config.max_new_tokens
    num_blocks = len(prompts) * (-(-longest // block_size)) + 4  # every request fits at once
    jobs = [("max_num_seqs", c, dict(max_num_seqs=c)) for c in CONCURRENCY]
    jobs += [("max_batch_tokens", t, dict(max_batch_tokens=t, max_num_seqs=SWEEP_MAX_SEQS)) for t in BATCH_TOKENS]
    rows = []
    for knob, value, kw in tqdm(jobs, desc="sweep", unit="point", disable=not progress):
        config = BatchConfig(num_blocks=num_blocks, block_size=block_size, **kw)
        rows.append(_row(knob, value, run_engine(model, prompts, generation_config, config)))
    print_table(rows, list(rows[0]))
    path = result_path("sweep", "csv", out_dir)
    write_csv(path, rows)
    print(f"wrote {path}")
    plot_sweep(rows, path.with_suffix(".png"))
    return rows


def plot_sweep(rows: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for knob, marker in (("max_num_seqs", "o"), ("max_batch_tokens", "s")):
        pts = [r for r in rows if r["knob"] == knob and r["itl_mean_ms"]]
        xs = [float(r["itl_mean_ms"]) for r in pts]
        ys = [float(r["tokens_per_s"]) for r in pts]
        ax.plot(xs, ys, marker=marker, label=f"varying {knob}")
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(str(r["value"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean time between tokens (ms)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("cbkernels: throughput against latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")

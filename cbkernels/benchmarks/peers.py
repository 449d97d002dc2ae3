"""cbkernels against its peers on the same prompts, in one run: transformers' own continuous
batching (``generate_batch`` with sdpa and paged|eager, in a small-cache configuration
(32 pages of 256 tokens, a 1024-token step) and in its default one) and sequential ``generate()``.

Absolute CPU times are noisy; the ratios within one run are the result. Every run's tokens
are compared with sequential greedy ``generate()`` (the ``identical`` column).
"""
from __future__ import annotations

import statistics
import time

import torch

from .common import print_table, pyplot, result_path, write_csv

# transformers' continuous batching with a cache small enough for a laptop CPU (its pages hold
# 256 tokens), and cbkernels given the same token capacity and step budget.
SMALL_CACHE = dict(num_blocks=32, max_batch_tokens=1024)
TF_PAGE_SIZE = 256
OUR_BLOCK_SIZE = 16
SAME_CACHE = dict(num_blocks=SMALL_CACHE["num_blocks"] * TF_PAGE_SIZE // OUR_BLOCK_SIZE, block_size=OUR_BLOCK_SIZE,
                  max_batch_tokens=SMALL_CACHE["max_batch_tokens"])
SEQUENTIAL = "sequential generate()"
TF_SMALL = "transformers generate_batch sdpa, small cache"
TF_PAGED_EAGER = "transformers generate_batch paged|eager, small cache"
TF_DEFAULT = "transformers generate_batch sdpa, default config"
OURS = "cbkernels Engine fifo, same cache"
OURS_PREFILL_FIRST = "cbkernels Engine prefill_first, same cache"
# Peers every run is divided by: (column name, run name).
RATIO_TO = [("x_vs_tf_small", TF_SMALL), ("x_vs_tf_default", TF_DEFAULT), ("x_vs_sequential", SEQUENTIAL)]


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def run_sequential(model, prompts, gc):
    tokens = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            tokens.append(out[0, len(p):].tolist())
    return tokens, float("nan"), float("nan")


def run_transformers(model, prompts, gc, attn, cb_kwargs):
    from transformers import ContinuousBatchingConfig

    previous = model.config._attn_implementation
    model.set_attn_implementation(attn)
    try:
        cfg = ContinuousBatchingConfig(**cb_kwargs) if cb_kwargs else None
        outs = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cfg,
                                    record_timestamps=True, progress_bar=False, warmup=False)
    finally:
        model.set_attn_implementation(previous)
    ordered = sorted(outs.values(), key=lambda o: int(o.request_id.split("_")[-1]))
    ttft = [o.timestamps[0] - o.created_time for o in ordered if o.timestamps]
    itl = [b - a for o in ordered if o.timestamps for a, b in zip(o.timestamps, o.timestamps[1:])]
    return [list(o.generated_tokens) for o in ordered], _mean(ttft), _mean(itl)


def run_cbkernels(model, prompts, gc, config):
    from ..engine import Engine

    engine = Engine(model, config)
    outs = engine.generate(prompts, gc)
    leaked = engine.cache.num_blocks - engine.cache.get_num_free_blocks()
    if leaked:
        raise RuntimeError(f"{leaked} cache blocks still held after the run")
    ttft = [o.ttft_s for o in outs if o.ttft_s is not None]
    itl = [x for o in outs for x in o.itl_s]
    return [o.generated_tokens for o in outs], _mean(ttft), _mean(itl)


def run_peers(model, prompts, gc, *, include_default=True, out_dir=None, progress=True) -> list[dict]:
    from tqdm import tqdm

    from ..engine.config import BatchConfig

    with torch.no_grad():  # one-time initialisation is nobody's cost
        warm = torch.tensor([prompts[0]], device=model.device)
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False,
                       pad_token_id=gc.pad_token_id)
    runs = [
        (SEQUENTIAL, lambda: run_sequential(model, prompts, gc)),
        (TF_SMALL, lambda: run_transformers(model, prompts, gc, "sdpa", SMALL_CACHE)),
        (TF_PAGED_EAGER, lambda: run_transformers(model, prompts, gc, "paged|eager", SMALL_CACHE)),
        (TF_DEFAULT, lambda: run_transformers(model, prompts, gc, "sdpa", None)),
        (OURS, lambda: run_cbkernels(model, prompts, gc, BatchConfig(**SAME_CACHE))),
        (OURS_PREFILL_FIRST, lambda: run_cbkernels(model, prompts, gc, BatchConfig(scheduler="prefill_first", **SAME_CACHE))),
    ]
    if not include_default:
        runs = [r for r in runs if r[0] != TF_DEFAULT]
    rows, reference = [], None
    for name, fn in tqdm(runs, desc="engines", unit="run", disable=not progress):
        start = time.perf_counter()
        try:
            tokens, ttft, itl = fn()
            error = ""
        except Exception as exc:  # a failing peer is a result, not a crash
            tokens, ttft, itl, error = None, float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:200]
        wall = time.perf_counter() - start
        if reference is None:
            reference = tokens
        generated = sum(map(len, tokens)) if tokens else 0
        identical = sum(a == b for a, b in zip(tokens or [], reference or []))
        rows.append({"run": name, "wall_s": round(wall, 2), "generated": generated,
                     "tokens_per_s": round(generated / wall, 1) if generated else 0.0,
                     "ttft_mean_ms": round(1e3 * ttft, 1), "itl_mean_ms": round(1e3 * itl, 1),
                     "identical": f"{identical}/{len(prompts)}", "error": error})
    speed = {r["run"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        for column, peer in RATIO_TO:
            base = speed.get(peer)
            r[column] = round(r["tokens_per_s"] / base, 2) if base else float("nan")
    lens = sorted(len(p) for p in prompts)
    print(f"\n{len(prompts)} prompts of {lens[0]}-{lens[-1]} tokens, max_new_tokens={gc.max_new_tokens}, greedy, "
          f"{next(model.parameters()).dtype}, {torch.get_num_threads()} threads")
    print_table(rows, ["run", "wall_s", "tokens_per_s", "ttft_mean_ms", "itl_mean_ms"] + [c for c, _ in RATIO_TO]
                + ["identical"])
    path = result_path("engine_peers", "csv", out_dir)
    write_csv(path, [r | {"prompts": len(prompts), "max_new_tokens": gc.max_new_tokens} for r in rows])
    print(f"wrote {path}")
    plot_peers(rows, path.with_suffix(".png"))
    return rows


def plot_peers(rows, path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    names = [r["run"] for r in rows][::-1]
    values = [r["tokens_per_s"] for r in rows][::-1]
    colors = ["tab:orange" if n.startswith("cbkernels") else "tab:gray" for n in names]
    ax.barh(names, values, color=colors)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("generated tokens / s (higher is better)")
    ax.set_title("Same prompts, same model, one run")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")

"""Engine benchmark: the same chat prompts through cbkernels.Engine, transformers'
generate_batch (sdpa and paged|eager with a small cache, and its default config) and
sequential generate(), in ONE run (absolute CPU times are noisy: compare the ratios).

    python bench/bench_engine.py [--prompts 16] [--max-new-tokens 32] [--threads 2] [--skip-default]

Prints a table and writes bench/results/engine_<device>_<timestamp>.csv with tokens/s,
TTFT, ITL, the ratio to transformers' generate_batch (small cache) and whether the tokens
are identical to sequential generate().
"""
from __future__ import annotations

import argparse
import csv
import datetime
import pathlib
import platform
import statistics
import time

import torch
from transformers import GenerationConfig

import cbkernels
from cbkernels import BatchConfig, Engine
from cbkernels.models import load_default_model

TOPICS = ["the French revolution", "photosynthesis", "black holes", "the history of the bicycle", "sourdough bread",
          "quantum computing", "the Roman empire", "honeybees", "volcanoes", "jazz music", "the stock market",
          "machine learning", "coral reefs", "the printing press", "chess openings", "climate change"]
STYLES = ["in one sentence.", "to a ten-year-old, with an example.",
          "in detail: its origins, how it works, why it matters today, and one common misconception about it.",
          "as a short poem."]
RESULTS = pathlib.Path(__file__).parent / "results"


def chat_prompts(tok, n):
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} {STYLES[i % len(STYLES)]}"}]
        ids = tok.apply_chat_template(msg, add_generation_prompt=True)
        out.append(list(ids if isinstance(ids, list) else ids["input_ids"]))
    return out


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def run_sequential(model, prompts, gc):
    tokens, ttfts = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            t0 = time.perf_counter()
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 generation_config=gc)
            tokens.append(out[0, len(p):].tolist())
            ttfts.append(time.perf_counter() - t0)  # whole request (no streaming here)
    return tokens, time.perf_counter() - start, float("nan"), float("nan")


def run_transformers(model, prompts, gc, attn, cb_kwargs):
    from transformers import ContinuousBatchingConfig

    model.set_attn_implementation(attn)
    cfg = ContinuousBatchingConfig(**cb_kwargs) if cb_kwargs else None
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cfg,
                                record_timestamps=True, progress_bar=False, warmup=False)
    wall = time.perf_counter() - start
    model.set_attn_implementation("sdpa")
    ordered = sorted(outs.values(), key=lambda o: int(o.request_id.split("_")[-1]))
    ttft = [o.timestamps[0] - o.created_time for o in ordered if o.timestamps]
    itl = [b - a for o in ordered if o.timestamps for a, b in zip(o.timestamps, o.timestamps[1:])]
    return [o.generated_tokens for o in ordered], wall, _mean(ttft), _mean(itl)


def run_cbkernels(model, prompts, gc, config):
    engine = Engine(model, config)
    start = time.perf_counter()
    outs = engine.generate(prompts, gc)
    wall = time.perf_counter() - start
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    ttft = [o.ttft_s for o in outs if o.ttft_s is not None]
    itl = [x for o in outs for x in o.itl_s]
    return [o.generated_tokens for o in outs], wall, _mean(ttft), _mean(itl)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-default", action="store_true", help="skip transformers' default CB config (large RAM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default_model(torch.float32)
    prompts = chat_prompts(tok, args.prompts)
    gc = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id)
    with torch.no_grad():  # warm-up: one-time initialisation is nobody's cost
        model.generate(torch.tensor([prompts[0]]), attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
                       generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0))
    small = dict(num_blocks=32, max_batch_tokens=1024)
    runs = [
        ("sequential generate()", lambda: run_sequential(model, prompts, gc)),
        ("transformers generate_batch sdpa small-cache", lambda: run_transformers(model, prompts, gc, "sdpa", small)),
        ("transformers generate_batch paged|eager small-cache",
         lambda: run_transformers(model, prompts, gc, "paged|eager", small)),
        ("cbkernels Engine default", lambda: run_cbkernels(model, prompts, gc, BatchConfig())),
        ("cbkernels Engine prefill_first", lambda: run_cbkernels(model, prompts, gc, BatchConfig(scheduler="prefill_first"))),
    ]
    if not args.skip_default:
        runs.insert(3, ("transformers generate_batch sdpa default-config",
                        lambda: run_transformers(model, prompts, gc, "sdpa", None)))
    rows, reference = [], None
    for name, fn in runs:
        try:
            tokens, wall, ttft, itl = fn()
            error = ""
        except Exception as e:  # a failing baseline is a result, not a crash
            tokens, wall, ttft, itl, error = None, float("nan"), float("nan"), float("nan"), repr(e)[:200]
        if reference is None:
            reference = tokens
        n_tok = sum(map(len, tokens)) if tokens else 0
        identical = sum(a == b for a, b in zip(tokens or [], reference))
        rows.append(dict(run=name, wall_s=wall, generated_tokens=n_tok, tokens_per_s=n_tok / wall if n_tok else 0.0,
                         ttft_mean_s=ttft, itl_mean_s=itl, identical=f"{identical}/{len(prompts)}", error=error))
        print(f"done: {name} {wall:.2f}s {error}", flush=True)
    base = {r["run"]: r["tokens_per_s"] for r in rows}
    small_tps = base["transformers generate_batch sdpa small-cache"]
    default_tps = base.get("transformers generate_batch sdpa default-config", float("nan"))
    meta = dict(device=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
                cbkernels=cbkernels.__version__, timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                prompt_lens=f"{min(map(len, prompts))}-{max(map(len, prompts))}", max_new_tokens=args.max_new_tokens)
    for r in rows:
        r["x_vs_tf_small_cache"] = r["tokens_per_s"] / small_tps if small_tps else float("nan")
        r["x_vs_tf_default"] = r["tokens_per_s"] / default_tps if default_tps == default_tps and default_tps else float("nan")
        r.update(meta)
    header = f"{'run':52s} {'wall_s':>7s} {'tok/s':>7s} {'TTFT_s':>7s} {'ITL_ms':>7s} {'x_small':>7s} {'x_dflt':>7s} identical"
    print(header)
    for r in rows:
        print(f"{r['run']:52s} {r['wall_s']:7.2f} {r['tokens_per_s']:7.1f} {r['ttft_mean_s']:7.2f} "
              f"{1000 * r['itl_mean_s']:7.1f} {r['x_vs_tf_small_cache']:7.2f} {r['x_vs_tf_default']:7.2f} "
              f"{r['identical']} {r['error']}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"engine_cpu_{datetime.datetime.now():%Y%m%d_%H%M%S}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Host work per engine step against the number of running decode requests.

A tiny random Llama (2 layers, hidden 64) on the PyTorch path makes the model's forward small,
so what is measured is what the host does around it every step: scheduling, the step plan and
its metadata, sampling, and bookkeeping after the step. Each point: ``n`` requests with a
256-token context decode together; the median of the measured steps is reported, split by phase.
On a GPU the forward of a real model takes a few tens of milliseconds at batch 256, so host
time per step has to stay far below that.
"""
from __future__ import annotations

import statistics
import time

from .common import device_name, pyplot, report

RUNNING = (16, 64, 256, 1024)
CONTEXT = 256  # prompt tokens of every request
MEASURED_STEPS = 12
GOAL_MS_AT_256 = 1.0


def measure(n: int, steps: int = MEASURED_STEPS) -> dict:
    import torch
    from transformers import GenerationConfig

    from ..engine import BatchConfig, Engine
    from ..testing import tiny_llama, token_prompts

    torch.set_num_threads(1)
    # Requests prefilled early decode while later ones prefill: enough new tokens that every
    # request is still running through the measured steps.
    max_new = 2 * steps + 64
    model = tiny_llama(vocab=512, max_positions=CONTEXT + max_new + 16)
    block_size = 16
    blocks = n * (-(-(CONTEXT + max_new) // block_size) + 1)
    config = BatchConfig(backend="torch", num_blocks=blocks, block_size=block_size, max_num_seqs=n,
                         max_batch_tokens=max(n, 8192), prefix_caching=False)
    engine = Engine(model, config)
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt in token_prompts([CONTEXT] * n, vocab=512):
        engine.add_request(prompt, gc)
    while any(len(r.tokens) == r.prompt_len for r in engine.requests.values()):
        engine.step()  # prefills (and the first decode of early ones)
    phases = {"schedule": [], "prepare": [], "sample": [], "postprocess": [], "host": [], "forward": []}
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        t = engine.last_step_timing
        for key in phases:
            phases[key].append(t[key] if key != "host" else total - t["forward"])
    running = len(engine.scheduler.running)
    return {"running": running, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in phases.items()}}


def run_host(out_dir=None, running=RUNNING) -> list[dict]:
    from tqdm import tqdm

    rows = [measure(n) for n in tqdm(running, desc="host work", unit="point")]
    csv_path = report("host", rows, ["running", "host_ms", "schedule_ms", "prepare_ms", "sample_ms",
                                     "postprocess_ms", "forward_ms"], out_dir)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["running"] for r in rows]
        for key in ("host_ms", "schedule_ms", "prepare_ms", "sample_ms", "postprocess_ms"):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=key.removesuffix("_ms"))
        ax.axhline(GOAL_MS_AT_256, color="grey", linestyle="--", label=f"goal at 256: {GOAL_MS_AT_256} ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("running decode requests")
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"host work per engine step ({device_name()})")
        ax.legend()
        fig.tight_layout()
        png = csv_path.with_suffix(".png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    return rows

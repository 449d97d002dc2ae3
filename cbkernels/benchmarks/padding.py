"""Padding waste: the tokens a statically padded batch computes against those the packed
batches of the engine actually run, for several prompt-length distributions.

A static batch pads every prompt to the longest one and keeps every row in the batch until
the longest generation ends: ``B * (max_prompt + max_generated)`` token positions. The
engine computes each request's own tokens (``prompt + generated - 1``, the last sampled
token is never fed back), plus any recomputation after preemption: the figure comes from a
real engine run on a tiny random model, so scheduling is counted, not estimated.
"""
from __future__ import annotations

import numpy as np

from .common import pyplot, report
from .workloads import tiny_llama

REQUESTS = 48
# (name, sampler of prompt lengths); generated lengths are uniform in [8, 64] for all.
DISTRIBUTIONS = {
    "uniform 32-128": lambda rng, n: rng.integers(32, 129, n),
    "long tail (lognormal)": lambda rng, n: np.clip(rng.lognormal(4.0, 0.9, n), 4, 1500).astype(int),
    "bimodal chat + documents": lambda rng, n: np.where(rng.random(n) < 0.8, rng.integers(10, 60, n),
                                                        rng.integers(600, 1200, n)),
}
GENERATED = (8, 64)


def padding_rows(seed: int = 0) -> list[dict]:
    from transformers import GenerationConfig

    from ..engine.config import BatchConfig
    from ..engine import Engine

    model = tiny_llama(vocab=256)
    rng = np.random.default_rng(seed)
    rows = []
    for name, sample in DISTRIBUTIONS.items():
        prompt_lens = sample(rng, REQUESTS).tolist()
        gen_lens = rng.integers(GENERATED[0], GENERATED[1] + 1, REQUESTS).tolist()
        engine = Engine(model, BatchConfig(max_batch_tokens=2048, max_num_seqs=REQUESTS, block_size=16))
        with engine._attention():
            ids = [engine.add_request(rng.integers(1, 256, n).tolist(),
                                      GenerationConfig(max_new_tokens=g, eos_token_id=None, pad_token_id=0))
                   for n, g in zip(prompt_lens, gen_lens)]
            while engine.scheduler.has_work():
                engine.step()
        packed = engine.metrics()["computed_tokens"]
        static = REQUESTS * (max(prompt_lens) + max(gen_lens))
        useful = sum(prompt_lens) + sum(gen_lens) - REQUESTS
        assert all(engine.requests[i].is_done for i in ids)
        rows.append({"distribution": name, "requests": REQUESTS,
                     "prompt_len_mean": f"{np.mean(prompt_lens):.0f}", "prompt_len_max": max(prompt_lens),
                     "static_padded_tokens": static, "packed_tokens": packed, "useful_tokens": useful,
                     "static_waste_pct": f"{100 * (1 - useful / static):.1f}",
                     "packed_waste_pct": f"{100 * (1 - useful / packed):.1f}",
                     "compute_saved_x": f"{static / packed:.2f}"})
    return rows


def run_padding(out_dir=None) -> list[dict]:
    rows = padding_rows()
    path = report("padding", rows, list(rows[0]), out_dir)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["static_padded_tokens"] for r in rows], 0.4, label="static padded batch")
        ax.bar(x + 0.2, [r["packed_tokens"] for r in rows], 0.4, label="cbkernels packed batches")
        ax.set_xticks(x, [r["distribution"] for r in rows], fontsize=8)
        ax.set_ylabel("token positions computed")
        ax.set_title(f"Padding waste, {REQUESTS} requests per distribution")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
        plt.close(fig)
        print(f"wrote {path.with_suffix('.png')}")
    return rows

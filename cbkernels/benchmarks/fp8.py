"""Accuracy of an fp8 KV cache: the same greedy generations with the model-dtype cache and
with each fp8 format, compared token by token.

* ``identical``: share of generated positions whose token equals the model-dtype cache's at
  that position (free-running: after a first difference the two continuations usually part,
  so this counts every later position of that request against fp8 too);
* ``common_prefix``: share of tokens generated before a request's first difference;
* ``|dlogp| mean / max``: absolute difference of the chosen token's log-probability, over the
  positions of each request's common prefix (the only ones where both runs saw the same
  context, so the difference is the cache format's alone);
* ``tf_identical`` / ``tf_dlogp_*`` (teacher-forced): every position of the model-dtype run is
  asked again with the fp8 cache, given the same preceding tokens (one request per position,
  the prompt plus the reference tokens before it, one new token; prefix caching shares the
  full blocks). The share of positions where fp8 picks the same greedy token, and the
  log-probability differences where it does: the per-token accuracy, free of the divergence
  that makes the free-running figures fall after a first difference.

Scales are the engine's computed ones (amax of each layer's first prefill x 2 / the format's
largest value; the embedded model's checkpoint carries none). ``cbkernels bench fp8``.
"""
from __future__ import annotations

import time

from .common import report

FORMATS = ("fp8_e4m3", "fp8_e5m2")
COLUMNS = ["kv_cache_dtype", "requests", "tokens", "tf_identical", "tf_dlogp_mean", "tf_dlogp_max", "identical",
           "common_prefix", "dlogp_mean", "dlogp_max", "wall_s", "cache_blocks"]


def _run(model, prompts, generation_config, kv_cache_dtype: str, **config):
    from ..engine import BatchConfig, Engine

    engine = Engine(model, BatchConfig(kv_cache_dtype=kv_cache_dtype, **config))
    start = time.perf_counter()
    outputs = engine.generate(prompts, generation_config, return_logprobs=True)
    return outputs, time.perf_counter() - start, engine.cache.num_blocks


def compare(base, other) -> dict:
    """Token agreement and log-probability differences of two runs over the same prompts."""
    positions = same = prefix = 0
    diffs = []
    for a, b in zip(base, other):
        n = max(len(a.generated_tokens), len(b.generated_tokens))
        positions += n
        same += sum(x == y for x, y in zip(a.generated_tokens, b.generated_tokens))
        k = 0
        while k < min(len(a.generated_tokens), len(b.generated_tokens)) and a.generated_tokens[k] == b.generated_tokens[k]:
            diffs.append(abs(a.logprobs[k] - b.logprobs[k]))
            k += 1
        prefix += k
    return {"tokens": positions, "identical": same / max(positions, 1), "common_prefix": prefix / max(positions, 1),
            "dlogp_mean": sum(diffs) / max(len(diffs), 1), "dlogp_max": max(diffs, default=0.0)}


def teacher_forced(model, prompts, base, generation_config, kv_cache_dtype: str, **config) -> dict:
    """Each reference position asked again under ``kv_cache_dtype`` with the reference prefix."""
    import copy

    from ..engine import BatchConfig, Engine

    asks, want = [], []
    for prompt, ref in zip(prompts, base):
        for k, token in enumerate(ref.generated_tokens):
            asks.append(list(prompt) + list(ref.generated_tokens[:k]))
            want.append((token, ref.logprobs[k]))
    one = copy.deepcopy(generation_config)
    one.max_new_tokens, one.min_new_tokens = 1, None
    engine = Engine(model, BatchConfig(kv_cache_dtype=kv_cache_dtype, **config))
    outputs = engine.generate(asks, one, return_logprobs=True)
    same, diffs = 0, []
    for out, (token, logprob) in zip(outputs, want):
        if out.generated_tokens and out.generated_tokens[0] == token:
            same += 1
            diffs.append(abs(out.logprobs[0] - logprob))
    return {"tf_identical": same / max(len(want), 1), "tf_dlogp_mean": sum(diffs) / max(len(diffs), 1),
            "tf_dlogp_max": max(diffs, default=0.0)}


def run_fp8(model, prompts, generation_config, out_dir=None, formats=FORMATS, **config) -> list[dict]:
    """One run per cache format on the same prompts; the first row is the model-dtype cache."""
    base, wall, blocks = _run(model, prompts, generation_config, "auto", **config)
    rows = [{"kv_cache_dtype": "auto", "requests": len(prompts), **compare(base, base), "tf_identical": 1.0,
             "tf_dlogp_mean": 0.0, "tf_dlogp_max": 0.0, "wall_s": wall, "cache_blocks": blocks}]
    for name in formats:
        outputs, wall, blocks = _run(model, prompts, generation_config, name, **config)
        forced = teacher_forced(model, prompts, base, generation_config, name, **config)
        rows.append({"kv_cache_dtype": name, "requests": len(prompts), **compare(base, outputs), **forced,
                     "wall_s": wall, "cache_blocks": blocks})
    report("fp8", rows, COLUMNS, out_dir)
    return rows


# --------------------------------------------------------------------------- decode speed (CUDA)
# Long-context decode: fp8 halves the K/V bytes a step reads, so tokens/s should approach 2x bf16
# where the kernel is bandwidth-bound. Goal on an H100 / H200: >= 1.7x at the longest context.
DECODE_CONTEXTS = (4096, 8192, 16384, 32768)
DECODE_SHAPE = dict(batch=16, hq=32, hkv=8, head_dim=128, block=16)
FP8_SPEEDUP_GOAL = 1.7


def decode_speed(contexts=DECODE_CONTEXTS, shape=DECODE_SHAPE, formats=(None, "fp8_e4m3", "fp8_e5m2")) -> list[dict]:
    """bf16 queries over a bf16 cache and over each fp8 cache: ms, GB/s of the bytes actually read
    (K/V at their element size, q and out), tokens/s (one token per sequence per launch)."""
    import torch

    from .paged_attention import L2_BYTES, MAX_ROTATION_COPIES, _paged_inputs, _rotating_bench

    fp8_dtypes = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    b, hq, hkv, d, block = (shape[k] for k in ("batch", "hq", "hkv", "head_dim", "block"))
    rows = []
    for ctx in contexts:
        for fmt in formats:
            elem = 1 if fmt else 2
            kv_bytes = 2 * b * ctx * hkv * d * elem
            copies = max(1, min(MAX_ROTATION_COPIES, -(-L2_BYTES // kv_bytes)))
            inputs = []
            for i in range(copies):
                inp = _paged_inputs([(1, ctx)] * b, hq, hkv, d, block, torch.bfloat16, "cuda", seed=i)
                if fmt:  # randn stays well inside both formats' range: scale 1
                    inp["k_cache"] = inp["k_cache"].to(fp8_dtypes[fmt])
                    inp["v_cache"] = inp["v_cache"].to(fp8_dtypes[fmt])
                inputs.append(inp)
            outs = [torch.empty_like(x["q"]) for x in inputs]
            one = torch.ones((), dtype=torch.float32, device="cuda")
            scales = dict(k_scale=one, v_scale=one) if fmt else {}

            def make(i, inputs=inputs, outs=outs, scales=scales):
                x = inputs[i]
                return lambda: _attend_scaled(x, outs[i], scales)

            ms = _rotating_bench(make, kv_bytes)
            moved = kv_bytes + 2 * b * hq * d * 2
            rows.append(dict(context=ctx, kv_cache=fmt or "bf16", batch=b, ms=ms, gbps=moved / ms / 1e6,
                             tokens_per_s=b / ms * 1e3))
            del inputs, outs
            torch.cuda.empty_cache()
    base = {r["context"]: r["tokens_per_s"] for r in rows if r["kv_cache"] == "bf16"}
    for r in rows:
        r["vs_bf16"] = r["tokens_per_s"] / base[r["context"]]
    return rows


def _attend_scaled(inp, out, scales):
    import cbkernels

    return cbkernels.paged_attention(
        inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"], inp["cu_seqlens_q"],
        out=out, max_seqlen_q=inp["max_seqlen_q"], max_seqlen_k=inp["max_seqlen_k"], **scales)


def main_decode(argv=None) -> int:
    """``python bench/bench_fp8_decode.py [--out DIR] [--verdicts FILE]``: decode speed, bf16 vs fp8."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description="fp8 against bf16 KV cache: decode GB/s and tokens/s")
    parser.add_argument("--out", help="result directory (default bench/results)")
    parser.add_argument("--verdicts", help="append verdict lines (JSON) to this file")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DECODE_CONTEXTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: decode speed is a GPU measurement (nothing timed).")
        return 0
    from .paged_attention import append_verdict

    rows = decode_speed(tuple(args.contexts))
    report("fp8_decode", rows, ["context", "kv_cache", "batch", "ms", "gbps", "tokens_per_s", "vs_bf16"], args.out)
    longest = max(args.contexts)
    for r in rows:
        if r["context"] == longest and r["kv_cache"] != "bf16":
            append_verdict(args.verdicts, f"decode tokens/s {r['kv_cache']} vs bf16 at {longest} context",
                           f">= {FP8_SPEEDUP_GOAL}x", f"{r['vs_bf16']:.2f}x", r["vs_bf16"] >= FP8_SPEEDUP_GOAL)
    return 0

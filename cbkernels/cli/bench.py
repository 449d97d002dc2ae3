"""``cbkernels bench``: the evidence, in one command.

* ``peers``: cbkernels against transformers' generate_batch (sdpa, paged|eager; small-cache
  and default configs) and sequential generate(), same prompts, one run;
* ``sweep``: throughput against latency over concurrency and step budgets (PNG);
* ``padding``: tokens a statically padded batch computes against the packed batches run;
* ``kernels``: the kernel microbenchmarks (GB/s, TFLOP/s on CUDA; the CPU path otherwise);
* ``overlap``: the engine with and without asynchronous scheduling, same prompts;
* ``fp8``: greedy tokens and log-probabilities with fp8 KV caches against the model-dtype
  cache, same prompts (not part of ``all``);
* ``host``: host work per engine step against running requests (a tiny model, so the
  scheduling, metadata and sampling around the forward is what is measured; on CUDA when
  there is a GPU; ``--quick``: 256 requests only).
* ``startup``: wall time of ``cbkernels generate`` in fresh processes, cold (one-time model
  conversion) and warm (not part of ``all``).
* ``schedule``: greedy against predictive admission and fixed against adaptive step budget
  under Poisson arrivals, three output-length workloads (not part of ``all``; ``--quick``:
  a small sample on the tiny model only).

Each writes CSV + PNG files under ``--out`` (default bench/results in a checkout).
"""
from __future__ import annotations

from pathlib import Path

from .common import UsageError, load_model_for_cli

PARTS = ("peers", "sweep", "padding", "kernels")


def _model_and_prompts(args):
    import torch
    from transformers import GenerationConfig

    from ..benchmarks.workloads import BENCH_PROMPTS, encode_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.random_llama:
        from ..benchmarks.workloads import llama_shaped, random_prompts

        model = llama_shaped(args.random_llama, dtype=dtype, device=device)
        prompts = random_prompts(args.prompts, model.config.vocab_size)
        # No EOS: every request generates max_new_tokens, so runs are comparable.
        gc = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return model, prompts, gc
    model, tok, device = load_model_for_cli(args.model, device)
    texts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(args.prompts)]
    prompts = encode_prompts(tok, texts)
    eos = model.generation_config.eos_token_id
    gc = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos if isinstance(eos, int) else 0)
    return model, prompts, gc


def run_bench(args) -> int:
    for name in ("prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.random_llama is not None and args.random_llama < 1:
        raise UsageError(f"--random-llama must be a positive layer count, got {args.random_llama}")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model: no such file or directory: {args.model}")
    if args.cache_dir:
        from ..model_cache import use_cache_dir

        use_cache_dir(args.cache_dir)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    parts = PARTS if args.part == "all" else (args.part,)
    progress = not args.quiet
    if args.part == "startup":
        from ..benchmarks.startup import run_startup

        run_startup(out_dir=out, progress=progress)
        return 0
    if args.part == "serve":
        from ..benchmarks.serve import run_serve_bench

        run_serve_bench(args.model, out_dir=out, max_tokens=args.max_new_tokens, quick=args.quick, threads=args.threads,
                        progress=progress)
        return 0
    if args.part == "overlap":
        from ..benchmarks.overlap import run_overlap

        model, prompts, gc = _model_and_prompts(args)
        run_overlap(model, prompts, gc, out_dir=out)
        return 0
    if args.part == "fp8":
        from ..benchmarks.fp8 import run_fp8

        model, prompts, gc = _model_and_prompts(args)
        run_fp8(model, prompts, gc, out_dir=out)
        return 0
    if args.part == "schedule":
        from ..benchmarks.schedule import run_schedule

        run_schedule(out_dir=out, quick=args.quick)
        return 0
    if args.part == "host":
        from ..benchmarks.host import RUNNING, run_host

        run_host(out_dir=out, running=(256,) if args.quick else RUNNING)  # on CUDA when there is one
        return 0
    if "peers" in parts or "sweep" in parts:
        model, prompts, gc = _model_and_prompts(args)
    if "peers" in parts:
        from ..benchmarks.peers import run_peers

        print("== engines side by side ==")
        run_peers(model, prompts, gc, include_default=not args.skip_default_peer, out_dir=out, progress=progress)
    if "sweep" in parts:
        from ..benchmarks.sweep import run_sweep

        print("\n== throughput against latency ==")
        run_sweep(model, prompts, gc, out_dir=out, progress=progress)
    if "padding" in parts:
        from ..benchmarks.padding import run_padding

        print("\n== padding waste ==")
        run_padding(out_dir=out)
    if "kernels" in parts:
        from ..benchmarks import kv_cache, paged_attention

        print("\n== kernel microbenchmarks ==")
        extra = ["--out", str(out)] if out else []
        quick = ["--quick"] if args.quick else []
        kv_cache.main(quick + extra)
        paged_attention.main(quick + extra)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: peers side by side, throughput-latency sweep, padding, kernels",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("part", nargs="?", choices=PARTS + ("startup", "host", "overlap", "serve", "fp8", "schedule", "all"), default="all")
    p.add_argument("--out", help="directory for CSV and PNG files (default bench/results)")
    p.add_argument("--model", help="local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where GGUF models are converted once and loaded from "
                                       "(default: $CBKERNELS_CACHE_DIR, else ~/.cache/cbkernels)")
    p.add_argument("--random-llama", type=int, metavar="LAYERS",
                   help="instead of a real model: random weights with Llama-3-8B layer shapes and this many layers "
                        "(GPU benchmarks; prompts are random token ids)")
    p.add_argument("--prompts", type=int, default=16, help="number of chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-default-peer", action="store_true",
                   help="skip transformers' default continuous-batching config (it sizes its cache to the machine)")
    p.add_argument("--quick", action="store_true", help="reduced kernel sweeps")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run_bench)

"""``cbkernels generate``: continuous batching on the embedded SmolLM2 or a local model."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ..prompts import PromptError, collect_prompts, encode
from ..engine.metrics import percentile
from ..engine.scheduler_names import ADMISSIONS, SCHEDULER_NAMES
from . import tensor_parallel as tp
from .common import UsageError, load_model_for_cli

# Cache blocks added to what the workload needs, so a prefill chunk never waits on the last block.
CACHE_SLACK_BLOCKS = 4


def _positive(name: str, value, *, allow_zero: bool = False):
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    return value


def check_numbers(args) -> None:
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--num-blocks", args.num_blocks)
    _positive("--block-size", args.block_size)
    _positive("--max-batch-tokens", args.max_batch_tokens)
    _positive("--temperature", args.temperature, allow_zero=True)
    _positive("--top-k", args.top_k, allow_zero=True)
    _positive("--target-itl-ms", args.target_itl_ms)
    if not (0.0 < args.top_p <= 1.0):
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.block_size & (args.block_size - 1):
        raise UsageError(f"--block-size must be a power of two, got {args.block_size}")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model: no such file or directory: {args.model}")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json: directory does not exist: {Path(args.json).parent}")


def workload_blocks(prompt_lens: list[int], max_new_tokens: int, block_size: int) -> int:
    """Blocks for every request at its longest: the cache fits the workload, not the machine."""
    need = sum(math.ceil((n + max_new_tokens) / block_size) for n in prompt_lens)
    return need + CACHE_SLACK_BLOCKS


def static_batch_ratio(outputs, computed_tokens: int) -> str:
    """Token positions a single statically padded batch would compute (every row padded to the
    longest prompt and kept until the longest generation ends) against those the engine ran."""
    if not outputs or not computed_tokens:
        return "-"
    longest = max(len(o.prompt_ids) for o in outputs) + max(len(o.generated_tokens) for o in outputs)
    static = len(outputs) * longest
    return f"{static} vs {computed_tokens} positions ({static / computed_tokens:.2f}x)"


def metrics_rows(outputs, wall_s: float, engine_metrics: dict) -> list[tuple[str, str]]:
    ok = [o for o in outputs if o.error is None]
    generated = sum(len(o.generated_tokens) for o in outputs)
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    itl = [x for o in ok for x in o.itl_s]
    e2e = [o.e2e_s for o in ok if o.e2e_s is not None]

    def ms(values, q):
        v = percentile(values, q)
        return "-" if v is None else f"{v * 1e3:.0f} ms"

    return [
        ("requests", f"{len(outputs)} ({len(outputs) - len(ok)} failed)"),
        ("generated tokens", str(generated)),
        ("tokens/s", f"{generated / wall_s:.1f}" if wall_s > 0 else "-"),
        ("TTFT p50 / p90", f"{ms(ttft, 0.5)} / {ms(ttft, 0.9)}"),
        ("ITL p50 / p90", f"{ms(itl, 0.5)} / {ms(itl, 0.9)}"),
        ("end-to-end p50 / p90", f"{ms(e2e, 0.5)} / {ms(e2e, 0.9)}"),
        ("KV cache", f"{engine_metrics['cache_tokens']} tokens, {engine_metrics['cache_gib'] * 1024:.1f} MiB "
                     f"({engine_metrics['cache_sizing']})"),
        ("peak cache occupancy", f"{100 * engine_metrics['cache_peak_occupancy']:.0f}% of {engine_metrics['cache_num_blocks']} blocks"),
        ("prefix cache hit rate", f"{100 * engine_metrics['prefix_hit_rate']:.0f}%"),
        ("padding saved vs padded steps", f"{100 * engine_metrics['padding_saved']:.0f}%"),
        ("compute vs one static padded batch", static_batch_ratio(outputs, engine_metrics["computed_tokens"])),
        ("preemptions", str(engine_metrics["preemptions"])),
        ("recomputed tokens (preemption)", str(engine_metrics.get("recomputed_tokens", "-"))),
        ("output length prediction error", _share(engine_metrics.get("length_prediction_error"))),
        ("admissions deferred by prediction", str(engine_metrics.get("admissions_deferred_by_prediction", "-"))),
        ("step budget (mean tokens)", _tokens(engine_metrics.get("step_budget_mean_tokens"))),
        ("target_itl_ms: deferred admissions / steps at the floor", _target(engine_metrics)),
        ("CPU malloc", engine_metrics.get("cpu_malloc", "-")),
    ]


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}% (mean |predicted - actual| / actual)"


def _target(m: dict) -> str:
    if m.get("target_itl_ms") is None:
        return "- (no target_itl_ms)"
    return f"{m['admissions_deferred_by_target']} / {m['step_budget_floor_steps']} (aim {m['step_budget_scale']:.2f} x target)"


def _tokens(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(rows, file=sys.stdout) -> None:
    width = max(len(k) for k, _ in rows)
    print("\nmetrics", file=file)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}", file=file)


def _stream_one(engine, tok, rid) -> None:
    """Print one request's answer token by token (decoding the whole answer keeps
    multi-token characters intact)."""
    shown = ""
    ids: list[int] = []
    for token in engine.stream(rid):
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=True)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")


def run_generate(args) -> int:
    check_numbers(args)
    tp.check(args)
    if args.cache_dir:
        from ..model_cache import use_cache_dir

        use_cache_dir(args.cache_dir)
    try:
        prompts = collect_prompts(args.prompts, args.file, sys.stdin)
    except PromptError as exc:
        raise UsageError(str(exc)) from None

    from transformers import GenerationConfig

    from ..engine import BatchConfig
    from ..engine import Engine

    if args.tp > 1:
        model, tok, device = tp.load(args)
    else:
        model, tok, device = load_model_for_cli(args.model, args.device, allow_pickle=args.allow_pickle)
    encoded = [encode(tok, p) for p in prompts]
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p) if args.do_sample else {}
    gen_config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos, do_sample=args.do_sample, **sampling)
    num_blocks = args.num_blocks or workload_blocks([len(e) for e in encoded], args.max_new_tokens, args.block_size)
    try:
        config = BatchConfig(num_blocks=num_blocks, block_size=args.block_size, max_batch_tokens=args.max_batch_tokens,
                             scheduler=args.scheduler, prefix_caching=not args.no_prefix_caching, seed=args.seed,
                             admission=args.admission, target_itl_ms=args.target_itl_ms)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    engine = tp.make_engine(model, config, tok) if args.tp > 1 else Engine(model, config)
    if not tp.leads(engine):
        return tp.follow_and_exit(engine)
    print(f"cbkernels generate: {len(prompts)} prompt(s) on {device}, backend {engine.backend}, "
          f"{num_blocks} cache blocks of {args.block_size}", file=sys.stderr)

    start = time.perf_counter()
    streaming = len(encoded) == 1 and not args.no_stream
    if streaming:
        rid = engine.add_request(encoded[0], gen_config)
        _stream_one(engine, tok, rid)
        outputs = [engine.pop_result(rid)]
    else:
        outputs = engine.generate(encoded, gen_config, progress_bar=not args.quiet)
    wall = time.perf_counter() - start
    if args.tp > 1:  # the other ranks stop following
        engine.stop()
        tp.finish()
    answers = [tok.decode(o.generated_tokens, skip_special_tokens=True) for o in outputs]
    if not streaming:
        for i, (prompt, out, answer) in enumerate(zip(prompts, outputs, answers), start=1):
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            print(f"\n[{i}] {shown}")
            print(f"    error: {out.error}" if out.error else "    " + answer.strip().replace("\n", "\n    "))
    metrics = engine.metrics()
    metrics["cache_sizing"] = ("--num-blocks" if args.num_blocks else
                               f"sized to the workload: {len(encoded)} prompt(s) at their longest + {CACHE_SLACK_BLOCKS} blocks")
    rows = metrics_rows(outputs, wall, metrics)
    print_table(rows)
    if args.json:
        record = {
            "model": args.model or "SmolLM2-135M-Instruct (embedded)", "device": device,
            "config": {k: getattr(config, k) for k in ("num_blocks", "block_size", "max_batch_tokens", "scheduler", "prefix_caching")},
            "wall_s": wall, "metrics": metrics, "table": dict(rows),
            "results": [{"prompt": p, "text": a, "tokens": o.generated_tokens, "status": o.status.value,
                         "error": o.error, "finish_reason": o.finish_reason, "ttft_s": o.ttft_s, "e2e_s": o.e2e_s}
                        for p, a, o in zip(prompts, answers, outputs)],
        }
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(o.error for o in outputs) else 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continuous batching on the embedded SmolLM2 or a local model",
                       description="Generate answers with continuous batching. Prompts come from arguments, "
                                   "--file (text: one per line; .jsonl: {\"prompt\": ...} or {\"messages\": [...]}), "
                                   "or standard input; with none, a built-in set of example prompts.")
    p.add_argument("prompts", nargs="*", help="prompt texts")
    p.add_argument("--file", "-f", help="prompt file (text or JSONL)")
    p.add_argument("--model", help="local transformers model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where GGUF models are converted once and loaded from "
                                       "(default: $CBKERNELS_CACHE_DIR, else ~/.cache/cbkernels)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (unsafe: runs code from the file)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: sized to the workload)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="token budget of one step")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="fifo")
    p.add_argument("--admission", choices=ADMISSIONS, default="greedy",
                   help="predictive: start a request only while the predicted peak of the cache fits")
    p.add_argument("--target-itl-ms", type=float, default=None,
                   help="size each step's token budget to keep p99 inter-token latency at this many ms")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-stream", action="store_true", help="do not stream a single prompt's tokens")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="PATH", help="write prompts, answers and metrics as JSON")
    tp.add_argument(p)
    p.set_defaults(func=run_generate)

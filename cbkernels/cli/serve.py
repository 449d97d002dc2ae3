"""``cbkernels serve``: an OpenAI-compatible HTTP server on the engine (cbkernels.server).

FastAPI and uvicorn are imported only when the server starts, so ``--help`` stays fast.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..engine.scheduler_names import ADMISSIONS, SCHEDULER_NAMES
from . import tensor_parallel as tp
from .common import UsageError

API_KEY_ENV = "CBKERNELS_API_KEY"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _check(args) -> None:
    for name in ("num_blocks", "block_size", "max_batch_tokens", "max_num_seqs", "max_request_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.block_size & (args.block_size - 1):
        raise UsageError(f"--block-size must be a power of two, got {args.block_size}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not math.isfinite(args.drain_timeout) or args.drain_timeout < 0:
        raise UsageError(f"--drain-timeout must be a non-negative number of seconds, got {args.drain_timeout}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.target_itl_ms is not None and not (math.isfinite(args.target_itl_ms) and args.target_itl_ms > 0):
        raise UsageError(f"--target-itl-ms must be a positive number of milliseconds, got {args.target_itl_ms}")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model: no such file or directory: {args.model}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key must not be empty")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UsageError("--served-model-name must not be empty")


def run_serve(args) -> int:
    _check(args)
    tp.check(args)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"the server needs the 'serve' extra ({exc.name} is missing): "
                         "pip install 'cbkernels[serve]'") from None
    if args.cache_dir:
        from ..model_cache import use_cache_dir

        use_cache_dir(args.cache_dir)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..engine import BatchConfig, Engine
    from ..server.app import ServerSettings
    from ..server.runner import run_server
    from .common import load_model_for_cli

    try:
        config = BatchConfig(num_blocks=args.num_blocks, block_size=args.block_size,
                             max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                             scheduler=args.scheduler, prefix_caching=not args.no_prefix_caching, seed=args.seed,
                             admission=args.admission, target_itl_ms=args.target_itl_ms)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.tp > 1:  # every rank loads its shard; rank 0 serves HTTP, the others follow its steps
        model, tokenizer, device = tp.load(args)
        engine = tp.make_engine(model, config, tokenizer)
        if not tp.leads(engine):
            return tp.follow_and_exit(engine)
    else:
        model, tokenizer, device = load_model_for_cli(args.model, args.device, allow_pickle=args.allow_pickle)
        engine = Engine(model, config)
    name = args.served_model_name or (DEFAULT_MODEL_NAME if args.model is None else Path(args.model).name)
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    settings = ServerSettings(model_name=name, api_key=api_key, metrics_public=args.metrics_public,
                              max_waiting=args.max_queue, max_body_bytes=args.max_request_bytes,
                              drain_timeout_s=args.drain_timeout)
    print(f"cbkernels serve: {name} on {device}, backend {engine.backend}, {engine.cache.num_blocks} cache blocks "
          f"of {args.block_size} tokens, http://{args.host}:{args.port}/v1", flush=True)
    code = run_server(engine, tokenizer, settings, host=args.host, port=args.port, log_level=args.log_level,
                      access_log=args.access_log)
    if args.tp > 1:  # the other ranks stop following
        engine.stop()
        tp.finish()
    return code


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming, metrics)",
                       description="Serve a model over HTTP with the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models), /health and Prometheus /metrics. "
                                   "Needs: pip install 'cbkernels[serve]'.")
    p.add_argument("--model", help="local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct, "
                                   "offline)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                                     f"(default: ${API_KEY_ENV})")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond the --max-num-seqs running ones; more get 429 (default 256)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: seconds in-flight requests may take before they are cancelled")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV cache blocks (default: sized from a share of free memory)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="token budget of one engine step")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="fifo")
    p.add_argument("--admission", choices=ADMISSIONS, default="greedy",
                   help="predictive: start a request only while the predicted peak of the cache fits")
    p.add_argument("--target-itl-ms", type=float, default=None,
                   help="size each step's token budget to keep p99 inter-token latency at this many ms")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=None, help="seed of the engine's sampling generator")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", help="where GGUF models are converted once and loaded from")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (unsafe: runs code)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    tp.add_argument(p)
    p.set_defaults(func=run_serve)

"""The ``cbkernels`` command line.

Errors in what the user typed end with a one-line message and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


from .bench import add_parser as add_bench_parser
from .cache import add_parser as add_cache_parser
from .generate import UsageError, add_parser as add_generate_parser
from .serve import add_parser as add_serve_parser


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _selfcheck(args) -> int:
    import torch

    from .selfcheck import backend_name, run_selfcheck

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    dtype = getattr(torch, DTYPES[args.dtype])
    print(f"cbkernels selfcheck on {args.device}, {DTYPES[args.dtype]}, backend: {backend_name(args.device)}")
    rows = run_selfcheck(args.device, dtype)
    width = max(len(r[0]) for r in rows)
    for name, err, ok in rows:
        print(f"  {name.ljust(width)}  max |err| vs reference {err:.2e}  {'ok' if ok else 'FAILED'}")
    failed = [r for r in rows if not r[2]]
    print("all kernels agree with the reference" if not failed else f"{len(failed)} check(s) FAILED")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cbkernels", description="Paged-attention kernels and continuous batching for transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_generate_parser(sub)
    add_bench_parser(sub)
    add_cache_parser(sub)
    add_serve_parser(sub)
    check = sub.add_parser("selfcheck", help="run each kernel on random data and compare with the reference")
    check.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    check.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    check.set_defaults(func=_selfcheck)
    return parser


def main(argv=None) -> int:
    # Run offline: models load from local files only, never from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # CPU threads that wait for work sleep instead of spinning. With spinning (OpenMP's
    # default), torch's threads on a machine that is busy with anything else fight the other
    # work for every core: measured here, decoding SmolLM2 fell from 15 to 1.4 tokens/s on two
    # busy cores; sleeping threads keep 15. Read when torch loads, hence here, before any import
    # of it; OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line error
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"cbkernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

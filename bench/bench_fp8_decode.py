"""Decode speed with fp8 against bf16 KV caches (4k-32k context); the code lives in
cbkernels.benchmarks.fp8 so an installed package runs it too.

    python bench/bench_fp8_decode.py --help
"""
import sys

from cbkernels.benchmarks.fp8 import main_decode

if __name__ == "__main__":
    sys.exit(main_decode())

"""Kernel benchmark for kernels/kv_cache.py; the code lives in cbkernels.benchmarks.kv_cache so
that `cbkernels bench kernels` runs it from an installed package too.

    python bench/bench_kv_cache.py --help
"""
import sys

from cbkernels.benchmarks.kv_cache import main

if __name__ == "__main__":
    sys.exit(main())

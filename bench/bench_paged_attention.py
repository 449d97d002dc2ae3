"""Kernel benchmark for kernels/paged_attention.py; the code lives in cbkernels.benchmarks.paged_attention so
that `cbkernels bench kernels` runs it from an installed package too.

    python bench/bench_paged_attention.py --help
"""
import sys

from cbkernels.benchmarks.paged_attention import main

if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks behind ``cbkernels bench`` (and the scripts in bench/): each prints a table and
writes CSV (+ PNG) result files; none of them asserts anything."""

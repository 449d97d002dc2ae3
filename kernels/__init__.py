"""Triton kernels (installed as ``cbkernels.kernels``).

Keep this file free of imports and side effects: when the repository root is on
``sys.path`` it is also importable as a top-level ``kernels`` package, a name transformers
probes. The kernel modules are imported by ``cbkernels`` on first use.
"""

"""Pure-PyTorch references for every kernel in ``cbkernels.kernels``.

Same signatures as the public ``cbkernels`` functions; they favour clarity over speed and
compute attention in float64. Tests, benchmarks and the CPU fallback compare against them.
This package must stay free of import side effects (see docs/architecture.md).
"""
from .kv_cache import copy_blocks, gather_kv, scatter_kv
from .paged_attention import paged_attention

__all__ = ["scatter_kv", "gather_kv", "copy_blocks", "paged_attention"]

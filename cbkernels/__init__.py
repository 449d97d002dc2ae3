"""cbkernels: Triton paged-attention and KV-cache kernels with a continuous-batching layer
for Hugging Face transformers.

Layout: ``cbkernels.kernels`` (Triton jit code and launchers, a leaf), ``cbkernels.ops``
(checked public kernel entry points and the PyTorch path), ``cbkernels.attention`` (step
metadata, one backend per attention implementation, the transformers registration),
``cbkernels.engine`` (requests, cache, scheduler, runner, serving loop), ``cbkernels.cli``.
"""
from __future__ import annotations

import importlib
import importlib.util

from .attention.integration import register, register_on_import

# Public names load on first use (PEP 562): ``import cbkernels`` and the command line's --help
# stay free of torch and transformers.
_LAZY = {
    **dict.fromkeys(["scatter_kv", "gather_kv", "copy_blocks", "paged_attention"], ".ops"),
    **dict.fromkeys(["BlockPool", "CacheAllocator", "FullAttentionCacheAllocator",
                     "SlidingAttentionCacheAllocator"], ".engine.allocators"),
    "PagedAttentionCache": ".engine.cache",
    "BatchConfig": ".engine.config",
    "Engine": ".engine.engine", "generate_batch": ".engine.engine",
    "PrometheusExporter": ".engine.metrics",
    "RequestOutput": ".engine.requests", "RequestStatus": ".engine.requests",
    **dict.fromkeys(["FIFOScheduler", "PrefillFirstScheduler", "Scheduler"], ".engine.scheduler"),
    "enable": ".hf_api", "disable": ".hf_api",
}

__version__ = "0.1.0"

__all__ = [
    "scatter_kv", "gather_kv", "copy_blocks", "paged_attention",
    "BatchConfig", "Engine", "RequestOutput", "RequestStatus", "generate_batch", "register",
    "PagedAttentionCache", "CacheAllocator", "FullAttentionCacheAllocator", "SlidingAttentionCacheAllocator",
    "BlockPool", "Scheduler", "FIFOScheduler", "PrefillFirstScheduler", "PrometheusExporter", "enable", "disable",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # cbkernels.ops, cbkernels.reference, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


register_on_import()  # cheap: registers once transformers' modeling_utils is loaded

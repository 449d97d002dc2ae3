"""cbkernels: Triton paged-attention and KV-cache kernels with a continuous-batching layer
for Hugging Face transformers.

Layout: ``cbkernels.kernels`` (Triton jit code and launchers, a leaf), ``cbkernels.ops``
(checked public kernel entry points and the PyTorch path), ``cbkernels.attention`` (step
metadata, one backend per attention implementation, the transformers registration),
``cbkernels.engine`` (requests, cache, scheduler, runner, serving loop), ``cbkernels.cli``.
"""
from .ops import copy_blocks, gather_kv, paged_attention, scatter_kv
from .engine.allocators import BlockPool, CacheAllocator, FullAttentionCacheAllocator, SlidingAttentionCacheAllocator
from .engine.cache import PagedAttentionCache
from .engine.config import BatchConfig
from .engine.engine import Engine, generate_batch
from .attention.integration import register, register_on_import
from .engine.metrics import PrometheusExporter
from .engine.requests import RequestOutput, RequestStatus
from .engine.scheduler import FIFOScheduler, PrefillFirstScheduler, Scheduler

__version__ = "0.1.0"

__all__ = [
    "scatter_kv", "gather_kv", "copy_blocks", "paged_attention",
    "BatchConfig", "Engine", "RequestOutput", "RequestStatus", "generate_batch", "register",
    "PagedAttentionCache", "CacheAllocator", "FullAttentionCacheAllocator", "SlidingAttentionCacheAllocator",
    "BlockPool", "Scheduler", "FIFOScheduler", "PrefillFirstScheduler", "PrometheusExporter",
    "__version__",
]

register_on_import()  # cheap: registers once transformers' modeling_utils is loaded

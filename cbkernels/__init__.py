"""cbkernels: Triton paged-attention and KV-cache kernels with a continuous-batching layer
for Hugging Face transformers."""
from .ops import copy_blocks, gather_kv, paged_attention, scatter_kv
from .allocators import BlockPool, CacheAllocator, FullAttentionCacheAllocator, SlidingAttentionCacheAllocator
from .cache import PagedAttentionCache
from .config import BatchConfig
from .engine import Engine, generate_batch
from .integration import register, register_on_import
from .metrics import PrometheusExporter
from .requests import RequestOutput, RequestStatus
from .scheduler import FIFOScheduler, PrefillFirstScheduler, Scheduler

__version__ = "0.1.0"

__all__ = [
    "scatter_kv", "gather_kv", "copy_blocks", "paged_attention",
    "BatchConfig", "Engine", "RequestOutput", "RequestStatus", "generate_batch", "register",
    "PagedAttentionCache", "CacheAllocator", "FullAttentionCacheAllocator", "SlidingAttentionCacheAllocator",
    "BlockPool", "Scheduler", "FIFOScheduler", "PrefillFirstScheduler", "PrometheusExporter",
    "__version__",
]

register_on_import()  # cheap: registers once transformers' modeling_utils is loaded

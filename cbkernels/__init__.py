"""cbkernels: Triton paged-attention and KV-cache kernels with a continuous-batching layer
for Hugging Face transformers."""
from .ops import copy_blocks, gather_kv, paged_attention, scatter_kv

__version__ = "0.1.0"

__all__ = ["scatter_kv", "gather_kv", "copy_blocks", "paged_attention", "__version__"]

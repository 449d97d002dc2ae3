"""``BatchConfig``: every knob of the continuous-batching engine, in one dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.registry import BACKENDS as _BACKEND_CLASSES
from .scheduler_names import ADMISSIONS, SCHEDULER_NAMES as SCHEDULERS

BACKENDS = ("auto", *_BACKEND_CLASSES)
# KV-cache element formats: "auto" stores K/V in the model's dtype; the fp8 formats store one
# byte an element with per-layer, per-KV-head fp32 scales (docs/fp8.md).
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")


@dataclass(slots=True)
class BatchConfig:
    """Configuration of :class:`cbkernels.Engine`. A field of the wrong type raises
    ``TypeError``, a value of the right type out of range ``ValueError``; both name the field.

    * ``num_blocks``: physical KV blocks per layer; ``None`` sizes the cache
      (``cbkernels.engine.cache_sizing``): on CUDA from ``gpu_memory_utilization`` (default
      0.9) of the device, less what is in use and one maximal step's activation peak;
      otherwise, or when ``memory_fraction`` / ``max_cache_bytes`` is set, from
      ``memory_fraction`` (default 0.1) of free memory capped at ``max_cache_bytes``
      (default 2 GiB). ``engine.metrics()["cache_sizing"]`` says which rule chose the size.
    * ``max_batch_tokens``: token budget of one step (decodes + prefill chunks); prompts
      longer than what is left of it are prefilled in chunks (split prefill).
    * ``max_num_seqs``: at most this many requests run at once (default: 256 on CUDA, 64
      elsewhere; more than the cache's blocks is an error).
    * ``backend``: which attention code the engine runs. ``"auto"`` follows
      the public ops (CUDA -> Triton, CPU -> Triton interpreter if ``TRITON_INTERPRET=1``,
      else the vectorised PyTorch path); ``"torch"`` forces the PyTorch path on CPU (it is
      what the engine uses on a laptop even under a test session that interprets Triton);
      ``"triton"`` forces the public Triton-dispatching ops.
    * ``use_cuda_graph``: capture decode-only steps in CUDA graphs, one per padded batch-size
      bucket (``cbkernels.engine.cuda_graphs``). ``None`` (default) turns it on for CUDA models on the
      Triton backend and off otherwise (CPU, or ``backend="torch"``); ``True`` on a CPU model
      or with ``backend="torch"`` is an error.
    * ``async_scheduling``: schedule and build step N+1 while step N runs on the device
      (``cbkernels.engine.overlap``). ``None`` (default): on for CUDA, off elsewhere (a CPU
      has nothing to overlap; ``True`` there runs the same code, for tests).
    * ``kv_cache_dtype``: ``"auto"`` (the model's dtype) or ``"fp8_e4m3"`` / ``"fp8_e5m2"``:
      one byte an element, so the same memory holds twice the blocks of a bf16 cache. Scales
      come from the checkpoint (``k_scale`` / ``v_scale`` on the attention modules) or are
      computed from each layer's first prefill (docs/fp8.md). CUDA needs sm_90 or newer.
    * ``seed``: seeds the sampling generator (``do_sample=True``), for reproducible runs.
    * ``admission``: ``"greedy"`` admits a waiting request as soon as its prompt fits (and
      preempts when decodes later run short of blocks); ``"predictive"`` admits it only while
      the predicted peak block demand of everything running plus it fits the cache, from
      output lengths learned online (docs/scheduling.md). Preemption stays the fallback.
    * ``target_itl_ms``: ``None`` (default): every step's token budget is
      ``max_batch_tokens``. A number: each step's budget comes from a step-time model fitted
      online, to keep inter-token latency under this many milliseconds (at most
      ``max_batch_tokens``; never fewer than the running requests).
    """

    num_blocks: Optional[int] = None
    block_size: int = 16
    max_batch_tokens: int = 1024
    scheduler: str = "fifo"
    prefix_caching: bool = True
    max_num_seqs: Optional[int] = None
    backend: str = "auto"
    memory_fraction: Optional[float] = None
    max_cache_bytes: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None
    seed: Optional[int] = None
    device: Optional[torch.device] = None
    use_cuda_graph: Optional[bool] = None
    async_scheduling: Optional[bool] = None
    kv_cache_dtype: str = "auto"
    admission: str = "greedy"
    target_itl_ms: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        for name in ("num_blocks", "seed", "max_num_seqs", "max_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        for name in ("memory_fraction", "gpu_memory_utilization"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
        for name in ("scheduler", "backend"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.kv_cache_dtype, str):
            raise TypeError(f"kv_cache_dtype must be a str, got {type(self.kv_cache_dtype).__name__}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.admission, str):
            raise TypeError(f"admission must be a str, got {type(self.admission).__name__}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        if self.target_itl_ms is not None:
            if isinstance(self.target_itl_ms, bool) or not isinstance(self.target_itl_ms, (int, float)):
                raise TypeError(f"target_itl_ms must be a number or None, got {type(self.target_itl_ms).__name__}")
            if not math.isfinite(self.target_itl_ms) or self.target_itl_ms <= 0:
                raise ValueError(f"target_itl_ms must be a positive number of milliseconds or None, "
                                 f"got {self.target_itl_ms}")
        if not isinstance(self.prefix_caching, bool):
            raise TypeError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise TypeError(f"async_scheduling must be True, False or None, got {self.async_scheduling!r}")
        if self.use_cuda_graph is not None and not isinstance(self.use_cuda_graph, bool):
            raise TypeError(f"use_cuda_graph must be True, False or None, got {self.use_cuda_graph!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 or None, got {self.num_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 or None, got {self.max_num_seqs}")
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ValueError(f"max_cache_bytes must be >= 1 or None, got {self.max_cache_bytes}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("memory_fraction", "gpu_memory_utilization"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] or None, got {value}")
        if self.gpu_memory_utilization is not None and (self.memory_fraction is not None
                                                        or self.max_cache_bytes is not None):
            raise ValueError("gpu_memory_utilization and memory_fraction / max_cache_bytes are two ways to size "
                             "the cache: set one")

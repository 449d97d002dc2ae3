"""``BatchConfig``: every knob of the continuous-batching engine, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.registry import BACKENDS as _BACKEND_CLASSES
from .scheduler_names import SCHEDULER_NAMES as SCHEDULERS

BACKENDS = ("auto", *_BACKEND_CLASSES)


@dataclass(slots=True)
class BatchConfig:
    """Configuration of :class:`cbkernels.Engine`. A field of the wrong type raises
    ``TypeError``, a value of the right type out of range ``ValueError``; both name the field.

    * ``num_blocks``: physical KV blocks per layer; ``None`` sizes the cache from a memory
      budget (``memory_fraction`` of free memory, capped at ``max_cache_bytes``).
    * ``max_batch_tokens``: token budget of one step (decodes + prefill chunks); prompts
      longer than what is left of it are prefilled in chunks (split prefill).
    * ``max_num_seqs``: at most this many requests run at once.
    * ``backend``: which attention code the engine runs. ``"auto"`` follows
      the public ops (CUDA -> Triton, CPU -> Triton interpreter if ``TRITON_INTERPRET=1``,
      else the vectorised PyTorch path); ``"torch"`` forces the PyTorch path on CPU (it is
      what the engine uses on a laptop even under a test session that interprets Triton);
      ``"triton"`` forces the public Triton-dispatching ops.
    * ``use_cuda_graph``: capture decode-only steps in CUDA graphs, one per padded batch-size
      bucket (``cbkernels.engine.cuda_graphs``). ``None`` (default) turns it on for CUDA models on the
      Triton backend and off otherwise (CPU, or ``backend="torch"``); ``True`` on a CPU model
      or with ``backend="torch"`` is an error.
    * ``seed``: seeds the sampling generator (``do_sample=True``), for reproducible runs.
    """

    num_blocks: Optional[int] = None
    block_size: int = 16
    max_batch_tokens: int = 1024
    scheduler: str = "fifo"
    prefix_caching: bool = True
    max_num_seqs: int = 64
    backend: str = "auto"
    memory_fraction: float = 0.1
    max_cache_bytes: int = 2 << 30
    seed: Optional[int] = None
    device: Optional[torch.device] = None
    use_cuda_graph: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batch_tokens", "max_num_seqs", "max_cache_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        for name in ("num_blocks", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if isinstance(self.memory_fraction, bool) or not isinstance(self.memory_fraction, (int, float)):
            raise TypeError(f"memory_fraction must be a number, got {type(self.memory_fraction).__name__}")
        for name in ("scheduler", "backend"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.prefix_caching, bool):
            raise TypeError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")
        if self.use_cuda_graph is not None and not isinstance(self.use_cuda_graph, bool):
            raise TypeError(f"use_cuda_graph must be True, False or None, got {self.use_cuda_graph!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 or None, got {self.num_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")

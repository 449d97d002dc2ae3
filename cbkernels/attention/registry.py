"""Every attention backend by name, and how ``BatchConfig.backend`` picks one for a device.

``resolve_backend`` follows the public ops' dispatch (CUDA or the Triton interpreter -> Triton,
otherwise PyTorch).
"""
from __future__ import annotations

import torch

from .backend import AttentionBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchBackend, "triton": TritonBackend}


def resolve_backend(name: str, device: torch.device) -> str:
    """A backend name for ``device``: ``"auto"`` follows the public ops' dispatch."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {name!r}")
        return name
    from ..ops import use_triton

    return "triton" if use_triton(torch.empty(0, device=device)) else "torch"


def make_backend(name: str, cache, num_q_heads: int) -> AttentionBackend:
    return BACKENDS[resolve_backend(name, cache.kv.device)](cache, num_q_heads)


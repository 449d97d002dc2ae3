"""Small helpers shared by the kernel launchers."""
from __future__ import annotations

import os

import torch
import triton

# A pure copy moves bits, not numbers: launching on same-width integer views keeps one compiled
# kernel per element width and sidesteps the interpreter's broken bf16 (TRITON_ON_CPU.md).
_BITS_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret ``t`` as an integer tensor of the same element width (no copy)."""
    return t.view(_BITS_VIEW[t.element_size()])


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))

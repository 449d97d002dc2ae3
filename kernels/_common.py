"""Small helpers shared by the kernel launchers."""
from __future__ import annotations

import os

import torch
import triton

# A pure copy moves bits, not numbers: launching on same-width integer views keeps one compiled
# kernel per element width and sidesteps the interpreter's broken bf16 (docs/verification.md).
_BITS_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret ``t`` as an integer tensor of the same element width (no copy)."""
    return t.view(_BITS_VIEW[t.element_size()])


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class AotConfig:
    """One specialisation of a @triton.jit kernel, for the ahead-of-time compile gate.

    ``signature`` maps every argument to a Triton type ("*fp16", "i32", "constexpr", ...);
    ``constexprs`` gives the constexpr values; ``divisible`` names the integer arguments the
    JIT would see as multiples of 16 at run time (every pointer gets that hint automatically,
    as the JIT gives it to 16-byte-aligned tensors). ``archs`` limits the config to the compute
    capabilities whose launch heuristics pick it (None: every arch the gate builds for).
    """

    def __init__(self, name, kernel, signature, constexprs, num_warps, num_stages=1, divisible=(), archs=None):
        self.name = name
        self.kernel = kernel
        self.signature = signature
        self.constexprs = constexprs
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.divisible = tuple(divisible)
        self.archs = None if archs is None else tuple(archs)

    def __repr__(self) -> str:
        return f"AotConfig({self.name}, warps={self.num_warps}, stages={self.num_stages})"

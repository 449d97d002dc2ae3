"""FP8 KV-cache formats: the jit helpers that quantize on write and the format table.

A cache element of an fp8 cache holds ``round(x / scale)`` saturated to the format's finite
range; reading it back gives ``stored * scale``. ``scale`` is fp32, per tensor or per KV head.

Rounding is done here with integer and power-of-two arithmetic, not with Triton's fp32 -> fp8
conversion: Triton's interpreter drops the carry when rounding crosses into the next binade
(31.38 -> 16 instead of 32 in e4m3), so a conversion-based kernel could not be checked on CPU.
``round_to_fp8`` produces the fp32 value of the nearest fp8 number (ties to even), which every
backend then converts exactly; the result is bit-identical to torch's ``.to(float8_*)`` of the
saturated quotient (tests/test_fp8.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Fp8Format:
    dtype: torch.dtype
    triton_name: str  # pointer type in AOT signatures
    max_finite: float
    mantissa_bits: int
    min_normal_exp: int  # exponent of the smallest normal number
    min_arch: int  # oldest arch of the compile gate that builds this format's kernels


# Where each format compiles is the compile gate's answer (python -m cbkernels.aot):
# * e4m3 on sm_80: Triton refuses the type ("type fp8e4nv not supported in this architecture.
#   The supported fp8 dtypes are ('fp8e4b15', 'fp8e5')"; tests/test_aot.py checks it still
#   does). The launch tables map sm_89 to the sm_80 entries, so e4m3 needs sm_90.
# * e5m2 on sm_80: Triton 3.9 builds it (conversions emulated), but Triton 3.6 emits the sm_89
#   instruction for the scatter's fp32 -> e5m2 store and ptxas refuses it ("Feature 'cvt with
#   .e4m3x2/.e5m2x2' requires .target sm_89 or higher"). One rule for the supported range:
#   both formats need sm_90.
# * fp32 queries over an fp8 cache spill on sm_90 at every tile (255 registers, 368-6472 B of
#   spills: the fp8 -> fp32 converted tiles double the K/V registers of the IEEE-dot tiles), so
#   on CUDA an fp8 cache takes fp16 / bf16 queries only (the interpreter runs all three).
FP8_FORMATS = {
    torch.float8_e4m3fn: Fp8Format(torch.float8_e4m3fn, "fp8e4nv", 448.0, 3, -6, 90),
    torch.float8_e5m2: Fp8Format(torch.float8_e5m2, "fp8e5", 57344.0, 2, -14, 90),
}
FP8_DTYPES = tuple(FP8_FORMATS)
FP8_QUERY_DTYPES_CUDA = (torch.float16, torch.bfloat16)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_FORMATS


@triton.jit
def round_to_fp8(x, MAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr):
    """fp32 ``x`` -> the fp32 value of the nearest fp8 number (ties to even), saturated to
    ``[-MAX, MAX]``. The fp8 grid spacing at |x| is 2**(max(e, EMIN) - MANT) with e the binade
    of |x|; multiplying by its inverse and back is exact (powers of two), and adding then
    subtracting 2**23 rounds the scaled value to an integer, ties to even."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(x), MAX)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MANT
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
    r = ((a * inv_step + 8388608.0) - 8388608.0) * step
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)

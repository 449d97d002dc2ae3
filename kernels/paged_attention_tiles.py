"""Launch decisions of the paged-attention kernel: tiles per arch, grid size, split-KV.

Pure functions of shapes and device properties, kept apart from the jit code so that the
launcher, the engine's workspace sizing and the ahead-of-time compile gate share one answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_power_of_2

# Head dims below 64 (validation allows 16..56) run on the D = 64 tiles, masked: small heads are
# rare (test models) and it keeps the AOT config count at three head-dim pads (64, 128, 256).
MIN_D_PAD = 64
# Smallest M of tl.dot on tensor cores (mma.sync m16n8k16): decode tiles pad up to it.
DECODE_BLOCK_M = 16
# Rows of the wide decode tile: GQA groups of 17..32 query heads (or a few query tokens of a
# narrower group) in one program, at fp16/bf16 and D <= 128, instead of the prefill tile.
WIDE_DECODE_BLOCK_M = 32


@dataclass(frozen=True)
class Tile:
    block_m: int  # flattened (token, head_in_group) rows per program
    block_n: int  # keys per KV tile
    num_warps: int
    num_stages: int
    fast_paths: bool = True  # interior KV tiles unmasked (the kernel's FAST_PATHS)


def triton_version(text: str = triton.__version__) -> tuple[int, int]:
    """(major, minor) of a Triton version string such as "3.6.0" or "3.7.0+git1234"."""
    major, minor = text.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


@dataclass(frozen=True)
class VersionChoices:
    """The launch decisions that depend on the Triton release (docs/compatibility.md)."""

    sm90_prefill_half_stages: int | None  # num_stages of sm_90 fp16/bf16 prefill tiles; None: the table's
    interpreter_while_loops: bool  # interpreted kernels loop with while, not range() (LOOP_RANGE)


# The one place that picks by Triton version. Each entry names the compile-gate row that proves it
# (python -m cbkernels.aot --arch 90, run under each version):
# * Triton 3.6 fails its software pipeliner ("Pipeline failed while executing TritonGPUPipeline")
#   on every sm_90 fp16/bf16 prefill tile at num_stages 2 or 3, at 4 and 8 warps; num_stages 1
#   compiles, still on wgmma: paged_attention[prefill,fp16,d128,m64,n64,w8,s1] sm_90, 138
#   registers, 12 wgmma, no spills. Triton 3.7.1, 3.8 and 3.9 build the pipelined tiles.
#   sm_80 (mma.sync, cp.async) and every decode tile pipeline on 3.6 as they are.
# * Triton 3.6's interpreter keeps every scalar as a one-element array and turns a tensor into a
#   Python int with int(array), which NumPy 2.4 refuses for an array that is not 0-d: every
#   `for ... in range(runtime bound)` fails there ("only 0-dimensional arrays can be converted to
#   Python scalars"), whatever computes the bound. 3.7 and later squeeze the array first.
def version_choices(version: tuple[int, int], interpreted: bool) -> VersionChoices:
    old = version < (3, 7)
    return VersionChoices(sm90_prefill_half_stages=1 if old else None, interpreter_while_loops=old and interpreted)


def _while_range(start, stop=None):
    """range() as a while loop, for an interpreter that cannot turn a tensor bound into an int:
    compares and increments the bounds as tensors, which every interpreter can."""
    if stop is None:
        start, stop = 0, start
    it = start
    while it < stop:
        yield it
        it = it + 1


TRITON_VERSION = triton_version()
VERSION_CHOICES = version_choices(TRITON_VERSION, interpreting())
# The iterator of the kernels' runtime-bound loops (`for it in LOOP_RANGE(lo, hi)`). Compiled, it is
# tl.range, which the compiler treats exactly as range(): the same scf.for that num_stages
# pipelines (the PTX of every gate config, debug lines aside, is the same as with range() on
# 3.6 and 3.9). Interpreted, the kernel runs as Python: range() where the interpreter can index
# a tensor, _while_range on Triton 3.6 (the tiles visited and their order are the same).
if not interpreting():
    LOOP_RANGE = tl.range
elif VERSION_CHOICES.interpreter_while_loops:
    LOOP_RANGE = _while_range
else:
    LOOP_RANGE = range


# Launch tiles per arch, keyed by (kind, element size, padded head dim). Where the numbers came
# from (every entry checked in the AOT table, python -m cbkernels.aot --kernel paged_attention,
# which compiles every config for BOTH sm_80 and sm_90, so an entry must fit both):
# * decode BLOCK_M 16 is the mma.sync minimum (m16n8k16); decode is bandwidth-bound, so larger
#   M would only waste MMA. BLOCK_N 64 at 2-byte D <= 128: 79-164 registers, 20-38 KB smem.
# * prefill BLOCK_M 128 at D = 64 reaches wgmma on sm_90 (>= 64 rows; docs/verification.md) at 154
#   registers. At D = 128, M = 128 spilled on sm_80 (255 registers + 20 B spills: mma.sync keeps
#   the whole accumulator in registers) and sat at 238 on sm_90, so M = 64 (146-188 registers).
# * D = 256 halves N (and M for decode stays 16): the 256-wide K/V tiles double smem and regs.
#   Its decode tile runs 8 warps: with the fast path's branch, 4 warps spilled on sm_80 (168
#   registers, 8 B) where 8 warps take 108-128 registers (sm_80 / sm_90, fp8 caches included).
# * wide decode (17..32 rows, 2-byte D <= 128): M = 32 with 4 warps, 128-152 registers, where the
#   prefill tile it replaces holds 64-128 rows on 8 warps at 150-208 registers (one program per
#   SM on sm_80 at D = 64). D = 128 takes N = 32: N = 64 needed 210 registers.
# * fast_paths (the kernel's FAST_PATHS, interior tiles unmasked) is on wherever the gate shows it
#   costs no spill and no occupancy, so off for the 2-byte D = 64 decode tile: it took that tile
#   from 96 to 118-128 registers (5 -> 4 programs per SM) over fp8 caches on sm_90 and, on Triton
#   3.6, over fp16/bf16 on sm_80; what it saves there is ~58 PTX instructions per interior tile.
# * fp32 inputs run IEEE dots on FMA units, no MMA: M = 64 spilled on sm_80 (420 B at 4 warps),
#   M = 32 fits (107-154 registers); D = 256 halves M again.
# * num_stages: 3 on sm_90, whose 227 KB smem (cbkernels.aot.SHARED_MEMORY_LIMIT) holds a third
#   K/V buffer for the D <= 128 fp16/bf16 decode and D = 64 prefill tiles (<= 49 KB); 2 on sm_80
#   (163 KB, and its cp.async pipeline gains little from a third stage on a gather). The sm_90
#   fp16/bf16 prefill stages give way to VERSION_CHOICES where a Triton release cannot pipeline them.
def _tiles(arch: int, choices: VersionChoices = VERSION_CHOICES) -> dict[tuple[str, int, int], Tile]:
    stages = 3 if arch >= 90 else 2
    prefill_half = {64: stages, 128: 2, 256: 2}
    if arch >= 90 and choices.sm90_prefill_half_stages is not None:
        prefill_half = dict.fromkeys(prefill_half, choices.sm90_prefill_half_stages)
    return {
        ("decode", 2, 64): Tile(DECODE_BLOCK_M, 64, 4, stages, fast_paths=False),
        ("decode", 2, 128): Tile(DECODE_BLOCK_M, 64, 4, stages),
        ("decode", 2, 256): Tile(DECODE_BLOCK_M, 32, 8, 2),
        ("decode", 4, 64): Tile(DECODE_BLOCK_M, 32, 4, 2),
        ("decode", 4, 128): Tile(DECODE_BLOCK_M, 32, 4, 2),
        ("decode", 4, 256): Tile(DECODE_BLOCK_M, 16, 4, 2),
        ("decode_wide", 2, 64): Tile(WIDE_DECODE_BLOCK_M, 64, 4, stages),
        ("decode_wide", 2, 128): Tile(WIDE_DECODE_BLOCK_M, 32, 4, stages),
        ("prefill", 2, 64): Tile(128, 64, 8, prefill_half[64]),
        ("prefill", 2, 128): Tile(64, 64, 8, prefill_half[128]),
        ("prefill", 2, 256): Tile(64, 32, 8, prefill_half[256]),
        ("prefill", 4, 64): Tile(32, 32, 4, 2),
        ("prefill", 4, 128): Tile(32, 32, 8, 2),
        ("prefill", 4, 256): Tile(16, 32, 8, 2),
    }


TILES = {80: _tiles(80), 90: _tiles(90)}
# Archs newer than sm_90 reuse the sm_90 table; older ones (and the interpreter, which mirrors
# an H100's decisions) pick by the nearest entry at or below.
INTERPRETER_ARCH = 90

# Split-KV heuristic. The number of SMs of an H100 SXM stands in for the device when
# interpreting on CPU, so CPU runs take the decisions an H100 would.
INTERPRETER_SM_COUNT = 132
# Split only when the (q tile x KV head) programs fill less than this many waves of SMs: one
# program per SM leaves most of the bandwidth idle on a decode (flash-decoding's motivation).
SPLIT_WAVES_TARGET = 2
# Each segment keeps at least this many keys, so the extra partial write (D fp32 per row) and
# merge stay small next to the K/V bytes a segment streams (256 keys x D x 2 arrays).
SPLIT_MIN_KEYS = 256
# Upper bound on segments: beyond 16 the merge kernel's loop and scratch traffic outgrow the
# gain (a 132-SM GPU is filled by 16 splits of 8+ programs).
MAX_SPLITS = 16
# Scratch for partials is capped (fp32 acc + lse per split and row); wider batches do not split.
SPLIT_SCRATCH_MAX_BYTES = 512 * 1024 * 1024

# Merge kernel: one (token, q head) per program, 4 warps cover a 256-wide head row in one pass.
MERGE_NUM_WARPS = 4
# The merge loop reads one partial per split with nothing to prefetch across iterations: one
# stage, launched and compiled alike (the gate builds exactly this).
MERGE_NUM_STAGES = 1


def device_arch(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_ARCH
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major * 10 + minor >= 90 else 80


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def padded_head_dim(head_dim: int) -> int:
    """Next power of two, at least MIN_D_PAD (masked lanes cost little next to another config)."""
    return max(next_power_of_2(head_dim), MIN_D_PAD)


def tile_kind(arch: int, dtype: torch.dtype, head_dim: int, max_seqlen_q: int, group: int) -> tuple[str, int, int]:
    """The TILES key of a launch: the decode tile (M = 16) when one sequence's rows x heads fit
    in it, the wide decode tile up to WIDE_DECODE_BLOCK_M rows where one is listed, else prefill."""
    rows = max_seqlen_q * group
    size = 4 if dtype == torch.float32 else 2
    d_pad = padded_head_dim(head_dim)
    if rows <= DECODE_BLOCK_M:
        return "decode", size, d_pad
    if rows <= WIDE_DECODE_BLOCK_M and ("decode_wide", size, d_pad) in TILES[arch]:
        return "decode_wide", size, d_pad
    return "prefill", size, d_pad


def pick_tile(arch: int, dtype: torch.dtype, head_dim: int, max_seqlen_q: int, group: int) -> Tile:
    return TILES[arch][tile_kind(arch, dtype, head_dim, max_seqlen_q, group)]


def num_virtual_tiles(num_tokens: int, batch: int, group: int, block_m: int, max_seqlen_q: int) -> int:
    """Grid axis 0, from host ints only: ``batch`` when every sequence fits one tile, else the
    bound ``cdiv(T * group, BLOCK_M) + B`` of the module docstring."""
    if max_seqlen_q * group <= block_m:
        return batch
    return triton.cdiv(num_tokens * group, block_m) + batch


def pick_num_splits(programs: int, max_seqlen_k: int, sm_count: int, scratch_bytes_per_split: int) -> int:
    """Segments per q tile: split only while (q tiles x KV heads) programs fill fewer than
    SPLIT_WAVES_TARGET waves of the SMs, keeping SPLIT_MIN_KEYS keys per segment, at most
    MAX_SPLITS, within SPLIT_SCRATCH_MAX_BYTES of partials."""
    target = sm_count * SPLIT_WAVES_TARGET
    if programs <= 0 or programs >= target:
        return 1
    splits = min(triton.cdiv(target, programs), max_seqlen_k // SPLIT_MIN_KEYS, MAX_SPLITS)
    splits = min(splits, SPLIT_SCRATCH_MAX_BYTES // max(scratch_bytes_per_split, 1))
    return max(splits, 1)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the launcher decides from shapes and host bounds (no tensor values)."""

    tile: Tile
    d_pad: int
    grid_m: int
    num_splits: int

    def workspace_numel(self, num_tokens: int, num_q_heads: int) -> int:
        """fp32 elements of split-KV partials (acc + log-sum-exp per row); 0 without splits."""
        if self.num_splits == 1:
            return 0
        return self.num_splits * num_tokens * num_q_heads * (self.d_pad + 1)


def plan_launch(device: torch.device, dtype: torch.dtype, num_tokens: int, batch: int, num_q_heads: int,
                num_kv_heads: int, head_dim: int, max_seqlen_q: int, max_seqlen_k: int,
                num_splits: int | None = None) -> LaunchPlan:
    """The launch of one call; ``num_splits`` forces the split count (None: the heuristic)."""
    group = num_q_heads // num_kv_heads
    tile = pick_tile(device_arch(device), dtype, head_dim, max_seqlen_q, group)
    d_pad = padded_head_dim(head_dim)
    grid_m = num_virtual_tiles(num_tokens, batch, group, tile.block_m, max_seqlen_q)
    if num_splits is None:
        num_splits = pick_num_splits(grid_m * num_kv_heads, max_seqlen_k, sm_count(device),
                                     num_tokens * num_q_heads * (d_pad + 1) * 4)
    return LaunchPlan(tile, d_pad, grid_m, num_splits)


# --------------------------------------------------------------------------- AOT signature
# The compile gate's view of _paged_attention_kernel's arguments (kept here: plain data).
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _attention_signature(dtype: str, index: str, cache: str | None = None) -> dict[str, str]:
    cache = cache or dtype
    return {
        "q_ptr": f"*{dtype}", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}",
        "block_tables_ptr": "*i32", "seq_lens_ptr": f"*{index}", "cu_seqlens_q_ptr": f"*{index}",
        "sinks_ptr": "*fp32", "out_ptr": f"*{dtype}", "lse_ptr": "*fp32",
        "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
        "batch": "i32", "num_tokens": "i32", "num_q_heads": "i32", "group": "i32", "head_dim": "i32",
        "stride_q_tok": "i32", "stride_kv_slot": "i32", "stride_table": "i32", "log2_block_size": "i32",
        "scale_log2": "fp32", "softcap_scale": "fp32", "softcap_log2": "fp32", "sliding_window": "i32", "has_sinks": "i32",
        "store_lse": "i32", "num_splits": "i32", "one_tile_per_seq": "i32",
        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "scale_stride": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D_PAD": "constexpr",
        "IEEE_DOT": "constexpr", "UPCAST": "constexpr", "KV_FP8": "constexpr", "FAST_PATHS": "constexpr",
    }

"""Public kernel entry points: validate, then dispatch to a backend.

* CUDA tensors -> the compiled Triton kernels;
* CPU tensors with ``TRITON_INTERPRET=1`` -> the same Triton kernels, interpreted;
* CPU tensors otherwise -> the vectorised PyTorch path in ``cbkernels.ops.torch_path``.

Arguments are checked here (``cbkernels.ops.checks``), never inside ``cbkernels.kernels``,
which stays a leaf package of jit code and launchers.

Each entry point is a ``torch.library.custom_op`` with a fake implementation, so models
calling it compile under ``torch.compile`` without graph breaks. Outputs are allocated by
the Python wrapper and filled in place by the op, which keeps the op graph-capturable.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import torch_path as _torch_ops
from .checks import (
    check_copy_blocks,
    check_gather_kv,
    check_scatter_kv,
    prepare_paged_attention,
)


def _interpreting() -> bool:
    from cbkernels.kernels._common import interpreting

    return interpreting()


def use_triton(t: torch.Tensor) -> bool:
    """Which backend a tensor on this device runs: Triton (compiled or interpreted) or torch."""
    return t.is_cuda or (t.device.type == "cpu" and _interpreting())


def _kernel_module(name: str):
    # Imported on first use so that TRITON_INTERPRET, read when @triton.jit runs, can still be
    # set after ``import cbkernels``.
    return importlib.import_module(f"cbkernels.kernels.{name}")


# --------------------------------------------------------------------------- scatter_kv
@torch.library.custom_op("cbkernels::scatter_kv", mutates_args=("k_cache", "v_cache"))
def _scatter_kv_op(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> None:
    if use_triton(k_cache):
        _kernel_module("kv_cache").launch_scatter_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        _torch_ops.scatter_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_scatter_kv_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    return None


def scatter_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64; slot = block * block_size + offset, < 0 skips
    *,
    k_scale: torch.Tensor | None = None,  # fp8 caches (required there): [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each new key/value row into its cache slot, in place. An fp8 cache stores
    ``row / scale`` saturated to the format's finite range, rounded to nearest even."""
    check_scatter_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    _scatter_kv_op(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# --------------------------------------------------------------------------- gather_kv
@torch.library.custom_op("cbkernels::gather_kv", mutates_args=())
def _gather_kv_op(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(k_cache):
        return _kernel_module("kv_cache").launch_gather_kv(k_cache, v_cache, block_tables, seq_lens,
                                                           k_scale, v_scale, dtype)
    return _torch_ops.gather_kv(k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, dtype)


@_gather_kv_op.register_fake
def _(k_cache, v_cache, block_tables, seq_lens, k_scale=None, v_scale=None, dtype=None):
    total = torch.library.get_ctx().new_dynamic_size()
    shape = (total, k_cache.shape[2], k_cache.shape[3])
    cu = seq_lens.new_empty((seq_lens.shape[0] + 1,), dtype=torch.int32)
    out = _torch_ops.gather_dtype(k_cache.dtype, dtype)
    return k_cache.new_empty(shape, dtype=out), v_cache.new_empty(shape, dtype=out), cu


def gather_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32/int64
    *,
    k_scale: torch.Tensor | None = None,  # fp8 caches (required there): [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,  # fp8 caches: output dtype, None = float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each sequence's KV history out of the cache: ``keys, values [sum(seq_lens), Hkv, D]``
    packed in sequence order, and ``cu_seqlens_k [B + 1] int32``. An fp8 cache is dequantized
    (``stored * scale`` in fp32, rounded once to ``dtype``, float32 by default); other caches
    come out in their own dtype and take no ``dtype``."""
    check_gather_kv(k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, dtype)
    return _gather_kv_op(k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, dtype)


# --------------------------------------------------------------------------- copy_blocks
@torch.library.custom_op("cbkernels::copy_blocks", mutates_args=("k_cache", "v_cache"))
def _copy_blocks_op(k_cache: torch.Tensor, v_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    if use_triton(k_cache):
        _kernel_module("kv_cache").launch_copy_blocks(k_cache, v_cache, block_mapping)
    else:
        _torch_ops.copy_blocks(k_cache, v_cache, block_mapping)


@_copy_blocks_op.register_fake
def _(k_cache, v_cache, block_mapping) -> None:
    return None


def copy_blocks(
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_mapping: torch.Tensor,  # [N, 2] int; rows of (src, dst)
) -> None:
    """Copy whole physical blocks src -> dst in both caches (copy-on-write of shared blocks)."""
    check_copy_blocks(k_cache, v_cache, block_mapping)
    _copy_blocks_op(k_cache, v_cache, block_mapping)


# --------------------------------------------------------------------------- paged_attention
@torch.library.custom_op("cbkernels::paged_attention", mutates_args=("out", "lse", "workspace"))
def _paged_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor],
    scale: float, sliding_window: Optional[int], softcap: Optional[float], sinks: Optional[torch.Tensor],
    max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], num_splits: Optional[int] = None,
    workspace: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    if use_triton(q):
        _kernel_module("paged_attention").launch_paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, lse,
            scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_splits=num_splits, workspace=workspace,
            k_scale=k_scale, v_scale=v_scale,
        )
    else:
        _torch_ops.paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, lse,
            scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
            k_scale=k_scale, v_scale=v_scale,
        )


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, lse, scale, sliding_window,
      softcap, sinks, max_seqlen_q, max_seqlen_k, num_splits=None, workspace=None, k_scale=None,
      v_scale=None) -> None:
    return None


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int; KV length of each sequence, new tokens included
    cu_seqlens_q: torch.Tensor,  # [B + 1] int; sequence b owns q rows cu[b]:cu[b+1]
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,  # [Hq]
    out: torch.Tensor | None = None,  # [T, Hq, D]
    return_lse: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,  # fp8 caches (required there): [] or [Hkv] fp32
    v_scale: torch.Tensor | None = None,
):
    """Causal paged attention over a mixed batch of decodes, chunked and whole prefills.

    Returns ``out [T, Hq, D]``, and ``lse [T, Hq]`` fp32 (natural log of the softmax
    denominator, sinks included) when ``return_lse``. The contract (row packing, causal
    alignment, window, softcap, sinks) is in the README's Kernel API section.
    ``num_splits`` forces the Triton kernel's split-KV segment count (None: its heuristic);
    the PyTorch path has no segments and computes the same result either way.
    An fp8 cache is read as ``stored * scale`` (``k_scale`` / ``v_scale``); ``q`` may then be
    fp16, bf16 or fp32, and sets the compute and output dtype.
    """
    scale, out, lse = prepare_paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale=scale,
        sliding_window=sliding_window, softcap=softcap, sinks=sinks, out=out, return_lse=return_lse,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_splits=num_splits,
        k_scale=k_scale, v_scale=v_scale,
    )
    _paged_attention_op(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, lse, scale,
        sliding_window, None if softcap is None else float(softcap), sinks, max_seqlen_q, max_seqlen_k, num_splits,
        None, k_scale, v_scale,
    )
    return (out, lse) if return_lse else out

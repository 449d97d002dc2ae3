"""Argument checks shared by every backend of the public kernels.

Each check raises ``ValueError`` naming the offending argument, before anything is
launched. Checks that read tensor *values* (slot ranges, block-table entries, cu_seqlens
order) need a device-to-host copy on CUDA; ``values_checkable`` says when they may run.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# KV-cache formats stored as 8-bit floats with an fp32 scale (dequantized = stored * scale).
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CACHE_DTYPES = FLOAT_DTYPES + FP8_DTYPES
INDEX_DTYPES = (torch.int32, torch.int64)
# Head dims the attention kernel tiles: padded to the next power of two and masked, so any
# multiple of 8 up to 256 works (8 keeps fp16/bf16 rows 16-byte aligned for vector loads).
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 16, 256, 8
# Block sizes the attention kernel supports: powers of two (one block = whole tiles).
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1, 1024


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = " or ".join(_dtype_name(d) for d in dtypes)
        raise ValueError(f"{name} must be {allowed}, got {_dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must match ``ref`` in shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({_dtype_name(ref.dtype)}), got {_dtype_name(t.dtype)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def values_checkable(*tensors: torch.Tensor) -> bool:
    """Value checks cost a sync on CUDA and are impossible while a graph is being captured
    or while torch.compile traces with fake tensors."""
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors):
        return not torch.cuda.is_current_stream_capturing()
    return True


def check_cache_pair(k_cache, v_cache) -> None:
    check_tensor("k_cache", k_cache, ndim=4, dtypes=CACHE_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=CACHE_DTYPES)
    check_same("v_cache", v_cache, "k_cache", k_cache)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def check_kv_scales(k_cache, k_scale, v_scale) -> None:
    """fp8 caches need both scales (fp32, ``[]`` or ``[Hkv]``, on the cache's device); other
    caches take none. On CUDA, fp8 needs an arch the compile gate builds fp8 kernels for."""
    if not is_fp8(k_cache.dtype):
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} is only for fp8 caches; k_cache is {_dtype_name(k_cache.dtype)}")
        return
    num_kv_heads = k_cache.shape[2]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} is required for an fp8 cache ({_dtype_name(k_cache.dtype)}): "
                             "dequantized = stored * scale")
        check_tensor(name, scale, dtypes=(torch.float32,), device=k_cache.device)
        if not (scale.dim() == 0 or (scale.dim() == 1 and scale.shape[0] == num_kv_heads)):
            raise ValueError(f"{name} must be [] (per tensor) or [{num_kv_heads}] (per KV head), "
                             f"got shape {tuple(scale.shape)}")
        if values_checkable(scale) and not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{name} must hold positive finite values")
    if k_scale.dim() != v_scale.dim():
        raise ValueError(f"v_scale must have the shape of k_scale {tuple(k_scale.shape)}, got {tuple(v_scale.shape)}")
    check_fp8_device(k_cache.device, k_cache.dtype)


def check_fp8_device(device: torch.device, dtype: torch.dtype, name: str = "k_cache") -> None:
    """An fp8 format on CUDA needs an arch the compile gate builds it for (kernels/fp8.py)."""
    if device.type != "cuda":
        return
    from cbkernels.kernels.fp8 import FP8_FORMATS

    major, minor = torch.cuda.get_device_capability(device)
    need = FP8_FORMATS[dtype].min_arch
    if major * 10 + minor < need:
        raise ValueError(f"{name}: {_dtype_name(dtype)} KV caches need compute capability >= {need / 10:.1f} "
                         f"(this GPU is sm_{major}{minor}; the compile gate builds them for sm_{need} and newer)")


def check_compute_dtype(name: str, t, k_cache) -> None:
    """Rows entering or leaving a cache: the cache's dtype, or any float dtype for fp8 caches
    (queries on CUDA: fp16 / bf16, the only ones the compile gate builds fp8 attention for)."""
    if is_fp8(k_cache.dtype):
        if name == "q" and t.is_cuda and t.dtype == torch.float32:
            raise ValueError("q must be float16 or bfloat16 over an fp8 cache on CUDA (fp32 queries spill "
                             "in every compiled tile), got float32")
        return
    if t.dtype != k_cache.dtype:
        raise ValueError(f"{name} must have the dtype of k_cache ({_dtype_name(k_cache.dtype)}), got {_dtype_name(t.dtype)}")


def check_scatter_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    check_cache_pair(k_cache, v_cache)
    device = k_cache.device
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_same("value", value, "key", key)
    check_compute_dtype("key", key, k_cache)
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"key must be [T, {k_cache.shape[2]}, {k_cache.shape[3]}] to match k_cache, got {tuple(key.shape)}"
        )
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must have {key.shape[0]} entries (one per key row), got {slot_mapping.shape[0]}")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.numel() and values_checkable(slot_mapping):
        top = int(slot_mapping.max())
        if top >= num_slots:
            raise ValueError(
                f"slot_mapping holds slot {top}, past the cache's {num_slots} slots "
                f"(num_blocks * block_size = {k_cache.shape[0]} * {k_cache.shape[1]})"
            )
    check_kv_scales(k_cache, k_scale, v_scale)


def check_block_tables(block_tables, seq_lens, k_cache, *, batch: int | None = None, values: bool = True) -> None:
    """Block table and lengths: dtypes, shapes, and (when cheap) that every used entry is valid."""
    device = k_cache.device
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if seq_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(
            f"seq_lens must have one entry per block_tables row ({block_tables.shape[0]}), got {seq_lens.shape[0]}"
        )
    if batch is not None and seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have {batch} entries, got {seq_lens.shape[0]}")
    if not values or seq_lens.numel() == 0 or not values_checkable(seq_lens, block_tables):
        return
    lens = seq_lens.to(torch.int64)
    if int(lens.min()) < 0:
        raise ValueError("seq_lens must be non-negative")
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    longest = int(lens.max())
    if longest > capacity:
        raise ValueError(
            f"block_tables is too narrow: {block_tables.shape[1]} blocks of {block_size} hold "
            f"{capacity} tokens, but seq_lens has a sequence of {longest}"
        )
    used_blocks = (lens + block_size - 1) // block_size  # [B]
    columns = torch.arange(block_tables.shape[1], device=device)
    used = columns[None, :] < used_blocks[:, None]
    entries = block_tables[used]
    if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= num_blocks):
        raise ValueError(f"block_tables has an entry outside [0, {num_blocks}) inside a sequence's length")


def check_gather_kv(k_cache, v_cache, block_tables, seq_lens, k_scale=None, v_scale=None, dtype=None) -> None:
    check_cache_pair(k_cache, v_cache)
    check_block_tables(block_tables, seq_lens, k_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    if dtype is not None:
        if not is_fp8(k_cache.dtype):
            raise ValueError(f"dtype is only for fp8 caches (the output of a {_dtype_name(k_cache.dtype)} "
                             "cache has its dtype); got dtype=" + repr(dtype))
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")


def check_copy_blocks(k_cache, v_cache, block_mapping) -> None:
    check_cache_pair(k_cache, v_cache)
    check_tensor("block_mapping", block_mapping, ndim=2, dtypes=INDEX_DTYPES, device=k_cache.device)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [N, 2] (src, dst) pairs, got {tuple(block_mapping.shape)}")
    if block_mapping.numel() == 0 or not values_checkable(block_mapping):
        return
    num_blocks = k_cache.shape[0]
    if int(block_mapping.min()) < 0 or int(block_mapping.max()) >= num_blocks:
        raise ValueError(f"block_mapping has a block id outside [0, {num_blocks})")
    dst = block_mapping[:, 1]
    if torch.unique(dst).numel() != dst.numel():
        raise ValueError("block_mapping must not name the same destination block twice")
    if bool(torch.isin(dst, block_mapping[:, 0]).any()):
        raise ValueError("block_mapping must not use a destination block as a source in the same call")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def check_paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, *,
    scale, sliding_window, softcap, sinks, out, max_seqlen_q, max_seqlen_k, num_splits=None,
    k_scale=None, v_scale=None,
) -> None:
    check_cache_pair(k_cache, v_cache)
    device = k_cache.device
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_compute_dtype("q", q, k_cache)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} does not match q head_dim {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q has {num_q_heads} heads, not a multiple of k_cache's {num_kv_heads} KV heads")
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(
            f"q head_dim {head_dim} is unsupported: need a multiple of {HEAD_DIM_MULTIPLE} "
            f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        )
    if not (_is_power_of_two(block_size) and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE):
        raise ValueError(f"k_cache block_size {block_size} must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have B + 1 >= 1 entries")
    batch = cu_seqlens_q.shape[0] - 1
    # Contract: with both host bounds given a CUDA launch needs no device-to-host sync, so the
    # checks that read tensor values run on CUDA only when a bound is missing (a sync anyway).
    values = not (q.is_cuda and max_seqlen_q is not None and max_seqlen_k is not None)
    check_block_tables(block_tables, seq_lens, k_cache, batch=batch, values=values)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window >= 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        if sinks.shape[0] != num_q_heads:
            raise ValueError(f"sinks must have one entry per query head ({num_q_heads}), got {sinks.shape[0]}")
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=FLOAT_DTYPES, device=device)
        check_same("out", out, "q", q)
    if num_splits is not None:
        from cbkernels.kernels.paged_attention_tiles import MAX_SPLITS

        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}] or None, got {num_splits!r}")
    for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if bound is not None and not (isinstance(bound, int) and bound >= 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {bound!r}")
    check_kv_scales(k_cache, k_scale, v_scale)
    if not values or not values_checkable(cu_seqlens_q, seq_lens):
        return
    cu = cu_seqlens_q.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at T = {q.shape[0]}, got {int(cu[0])} .. {int(cu[-1])}")
    q_lens = cu[1:] - cu[:-1]
    if batch and int(q_lens.min()) < 0:
        raise ValueError("cu_seqlens_q must be non-decreasing")
    if batch and bool((q_lens > seq_lens.to(torch.int64)).any()):
        raise ValueError("cu_seqlens_q gives a sequence more query rows than its seq_lens (keys include the new tokens)")
    if batch and max_seqlen_q is not None and int(q_lens.max()) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q {max_seqlen_q} is below the longest query chunk {int(q_lens.max())}")
    if batch and max_seqlen_k is not None and int(seq_lens.max()) > max_seqlen_k:
        raise ValueError(f"max_seqlen_k {max_seqlen_k} is below the longest sequence {int(seq_lens.max())}")


def prepare_paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, *,
    scale, sliding_window, softcap, sinks, out, return_lse, max_seqlen_q, max_seqlen_k, num_splits=None,
    k_scale=None, v_scale=None,
):
    """The front half every ``paged_attention`` entry point shares: validate, resolve the
    default scale, allocate ``out`` and (when asked) ``lse``. Returns ``(scale, out, lse)``."""
    check_paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale=scale,
        sliding_window=sliding_window, softcap=softcap, sinks=sinks, out=out,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_splits=num_splits,
        k_scale=k_scale, v_scale=v_scale,
    )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    return scale, out, lse

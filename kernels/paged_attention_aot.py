"""The paged-attention kernels' configurations for the ahead-of-time compile gate.

Kept apart from the kernels and their launcher: ``python -m cbkernels.aot`` builds exactly the
(dtype, head-dim pad, tile, cache format) specialisations ``paged_attention_tiles`` lets the
launcher pick, per arch, plus the split-KV merge.
"""
from __future__ import annotations

import torch

from ._common import AotConfig
from .fp8 import FP8_FORMATS, FP8_QUERY_DTYPES_CUDA
from .paged_attention import _merge_splits_kernel, _paged_attention_kernel
from .paged_attention_tiles import _TRITON_DTYPE, MERGE_NUM_STAGES, MERGE_NUM_WARPS, TILES, _attention_signature


def aot_configs() -> list[AotConfig]:
    """Every (dtype, head-dim pad, tile) the launcher can pick on sm_80 and sm_90, plus the merge.

    The launcher hands seq_lens / cu_seqlens_q to the kernel as int32 whatever their input
    dtype, so int32 is the only index specialisation. Head dims divisible by 16 (64, 96 as D,
    128, 256) are hinted as the JIT would see them.
    """
    configs = []
    for arch in sorted(TILES):
        for (kind, size, d_pad), tile in TILES[arch].items():
            dtypes = (torch.float32,) if size == 4 else (torch.float16, torch.bfloat16)
            for dtype in dtypes:
                name = _TRITON_DTYPE[dtype]
                fp8 = [f.triton_name for f in FP8_FORMATS.values()
                       if arch >= f.min_arch and dtype in FP8_QUERY_DTYPES_CUDA]
                for cache in [None] + fp8:
                    kv = f",kv={cache}" if cache else ""
                    configs.append(AotConfig(
                        f"paged_attention[{kind},{name}{kv},d{d_pad},m{tile.block_m},n{tile.block_n},"
                        f"w{tile.num_warps},s{tile.num_stages}]",
                        _paged_attention_kernel, _attention_signature(name, "i32", cache),
                        {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "D_PAD": d_pad,
                         "IEEE_DOT": dtype == torch.float32, "UPCAST": False, "KV_FP8": cache is not None,
                         "FAST_PATHS": tile.fast_paths},
                        tile.num_warps, tile.num_stages,
                        divisible=("head_dim", "stride_q_tok", "stride_kv_slot"), archs=(arch,),
                    ))
    for dtype, name in _TRITON_DTYPE.items():
        for d_pad in (64, 128, 256):
            configs.append(AotConfig(
                f"merge_splits[{name},d{d_pad}]", _merge_splits_kernel,
                {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "sinks_ptr": "*fp32", "out_ptr": f"*{name}",
                 "lse_ptr": "*fp32", "num_rows": "i32", "num_q_heads": "i32", "head_dim": "i32",
                 "has_sinks": "i32", "store_lse": "i32", "num_splits": "i32", "D_PAD": "constexpr"},
                {"D_PAD": d_pad}, MERGE_NUM_WARPS, MERGE_NUM_STAGES, divisible=("head_dim",),
            ))
    return configs

"""``cbkernels selfcheck``: run every kernel once on random data and compare with the reference."""
from __future__ import annotations

import torch

from .. import ops
from ..testing import TOLERANCES, make_paged_batch


def backend_name(device: str) -> str:
    probe = torch.empty(0, device=device)
    if not ops.use_triton(probe):
        return "PyTorch fallback"
    return "Triton (interpreted)" if probe.device.type == "cpu" else "Triton (compiled)"


def run_selfcheck(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> list[tuple[str, float, bool]]:
    """Returns (check, max abs error, passed) rows."""
    import cbkernels.reference as ref

    lengths = [(1, 37), (5, 18), (0, 9), (12, 12)]  # a decode, a chunked prefill, an idle row, a prefill
    batch = make_paged_batch(lengths, num_q_heads=6, num_kv_heads=2, head_dim=64, block_size=16,
                             dtype=dtype, device=device, seed=seed)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    keys, values, _ = ref.gather_kv(batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens)

    got_k, got_v, _ = ops.gather_kv(batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens)
    err = max((got_k.float() - keys.float()).abs().max().item(), (got_v.float() - values.float()).abs().max().item())
    rows.append(("gather_kv", err, err == 0.0))

    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    new_k = torch.randn(keys.shape, generator=gen).to(dtype).to(device)
    new_v = torch.randn(keys.shape, generator=gen).to(dtype).to(device)
    from ..ops.torch_path import slots_for

    slots = slots_for(batch.block_tables, batch.seq_lens, batch.k_cache.shape[1])
    ops.scatter_kv(new_k, new_v, k_cache, v_cache, slots)
    back_k, back_v, _ = ref.gather_kv(k_cache, v_cache, batch.block_tables, batch.seq_lens)
    err = max((back_k.float() - new_k.float()).abs().max().item(), (back_v.float() - new_v.float()).abs().max().item())
    rows.append(("scatter_kv", err, err == 0.0))

    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.cu_seqlens_q)
    for label, options in (("paged_attention", {}),
                           ("paged_attention +window+softcap", {"sliding_window": 8, "softcap": 30.0})):
        out = ops.paged_attention(*args, **options)
        expected = ref.paged_attention(*args, **options)
        err = (out.double() - expected.double()).abs().max().item()
        rows.append((label, err, err <= TOLERANCES[dtype] and not torch.isnan(out).any().item()))
    return rows

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


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _max_bit_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """0.0 when the tensors are equal bit for bit (NaN poison included), else the largest
    absolute difference (inf where only one side is NaN)."""
    as_int = _SAME_WIDTH_INT[got.element_size()]
    if torch.equal(got.view(as_int), expected.view(as_int)):
        return 0.0
    both_nan = torch.isnan(got) & torch.isnan(expected)
    diff = (got.double() - expected.double()).abs().masked_fill(both_nan, 0.0)
    return diff.nan_to_num(nan=float("inf")).max().item()


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

    # copy_blocks: two blocks copied onto two others (an unused block and a used one).
    mapping = torch.tensor([[0, k_cache.shape[0] - 1], [1, 2]], dtype=torch.int64, device=device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ref.copy_blocks(expected_k, expected_v, mapping)
    ops.copy_blocks(k_cache, v_cache, mapping)
    err = max(_max_bit_error(k_cache, expected_k), _max_bit_error(v_cache, expected_v))
    rows.append(("copy_blocks", err, err == 0.0))

    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.cu_seqlens_q)
    for label, options in (("paged_attention", {}),
                           ("paged_attention +window+softcap", {"sliding_window": 8, "softcap": 30.0})):
        out = ops.paged_attention(*args, **options)
        expected = ref.paged_attention(*args, **options)
        err = (out.double() - expected.double()).abs().max().item()
        rows.append((label, err, err <= TOLERANCES[dtype] and not torch.isnan(out).any().item()))
    return rows

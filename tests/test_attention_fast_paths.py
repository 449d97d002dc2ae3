"""The paged-attention kernel's tile-level fast paths and its wide decode tile.

* Fast path: KV tiles every row of a program sees in full run without the visibility mask
  (kernels/paged_attention.py, FAST_PATHS). The cases below are chosen, and checked with a host
  mirror of the kernel's tile ranges, to hold both interior and boundary tiles at the causal,
  window and length edges; each runs with the fast path on and off
  (CBKERNELS_ATTN_FAST_PATHS), against the fp64 reference on a NaN-poisoned cache. In interior
  tiles the mask selects every score, so on and off must agree bit for bit where the
  interpreter runs them.
* Wide decode tile: 17..32 rows (GQA groups wider than 16 heads, or two tokens of a 16-head
  group) run on a 32-row tile at fp16/bf16 and D <= 128.
"""
from __future__ import annotations

import pytest
import torch
import triton
from hypothesis import given
from hypothesis import strategies as st

import cbkernels
import cbkernels.kernels.paged_attention as pa_kernel
from cbkernels.kernels import paged_attention_tiles as tiles
from cbkernels.reference.paged_attention import paged_attention as reference
from cbkernels.testing import assert_close, make_paged_batch

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"


def _batch(lengths, *, hq, hkv, d=64, block=16, dtype=torch.float16, seed=0):
    return make_paged_batch(list(lengths), num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block,
                            dtype=dtype, device=DEVICE, seed=seed)


def _run(b, monkeypatch, fast: str, splits=None, **options):
    monkeypatch.setenv(pa_kernel.FAST_PATHS_ENV, fast)
    return cbkernels.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q,
                                     return_lse=True, num_splits=splits, max_seqlen_q=b.max_seqlen_q,
                                     max_seqlen_k=b.max_seqlen_k, **options)


def _tile_classes(lengths, group, tile, window, splits):
    """(interior, boundary) KV tiles the launch visits, by the kernel's formulas (host mirror)."""
    interior = boundary = 0
    n = tile.block_n
    for q_len, kv_len in lengths:
        first_pos = kv_len - q_len
        w = window or kv_len + 1
        for row_start in range(0, q_len * group, tile.block_m):
            last_tok = min(row_start + tile.block_m, q_len * group) - 1
            hi = first_pos + last_tok // group + 1
            tile_lo = max(first_pos + row_start // group - w + 1, 0) // n
            n_tiles = triton.cdiv(hi, n) - tile_lo
            per = triton.cdiv(n_tiles, splits)
            for split in range(splits):
                begin = tile_lo + split * per
                end = min(begin + per, tile_lo + n_tiles)
                int_lo = max(begin, triton.cdiv(max(first_pos + last_tok // group - w + 1, 0), n))
                int_hi = min(end, (first_pos + row_start // group + 1) // n)
                for it in range(begin, end):
                    inside = int_lo <= it < int_hi
                    interior += inside
                    boundary += not inside
    return interior, boundary


# (lengths [(q_len, kv_len)], hq, hkv, head dim, dtype, sliding_window, forced splits): decodes
# ending exactly on, one past and one before a tile edge; windows whose start falls inside a tile
# and on its edge; a chunked prefill over a long prefix; a mixed batch; the wide decode tile;
# splits. Every case runs on a tile whose fast path is on (the fp16/bf16 D = 64 decode tile keeps
# it off: kernels/paged_attention_tiles.py).
CASES = [
    ([(1, 129), (1, 128), (1, 127)], 4, 2, 128, torch.float16, None, None),
    ([(1, 400)], 4, 2, 128, torch.float16, 150, None),
    ([(1, 385)], 2, 1, 64, torch.float32, 128, None),
    ([(40, 300)], 4, 2, 64, torch.float16, None, None),
    ([(24, 200), (1, 97), (5, 70)], 4, 2, 64, torch.float32, 60, None),
    ([(1, 260), (2, 190)], 32, 2, 64, torch.bfloat16, None, None),
    ([(1, 700)], 4, 4, 128, torch.bfloat16, 300, 3),
]


@pytest.mark.parametrize("lengths,hq,hkv,d,dtype,window,splits", CASES)
def test_fast_path_matches_reference_and_the_masked_kernel(lengths, hq, hkv, d, dtype, window, splits, monkeypatch):
    b = _batch(lengths, hq=hq, hkv=hkv, d=d, dtype=dtype)
    plan = tiles.plan_launch(b.q.device, dtype, b.q.shape[0], len(lengths), hq, hkv, d,
                             b.max_seqlen_q, b.max_seqlen_k, splits)
    assert plan.tile.fast_paths
    interior, boundary = _tile_classes(lengths, hq // hkv, plan.tile, window, plan.num_splits)
    assert interior > 0 and boundary > 0, (interior, boundary)
    options = dict(sliding_window=window, softcap=5.0 if window else None)
    ref_out, ref_lse = reference(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q,
                                 return_lse=True, **options)
    fast_out, fast_lse = _run(b, monkeypatch, "1", splits, **options)
    slow_out, slow_lse = _run(b, monkeypatch, "0", splits, **options)
    for out, lse in ((fast_out, fast_lse), (slow_out, slow_lse)):
        assert_close(out, ref_out, dtype)
        assert_close(lse, ref_lse, dtype)
    if INTERPRETED:
        assert torch.equal(fast_out, slow_out) and torch.equal(fast_lse, slow_lse)
    else:
        assert_close(fast_out, slow_out, dtype)


def test_fast_paths_switch_is_validated(monkeypatch):
    b = _batch([(1, 20)], hq=2, hkv=1)
    monkeypatch.setenv(pa_kernel.FAST_PATHS_ENV, "yes")
    with pytest.raises(ValueError, match=pa_kernel.FAST_PATHS_ENV):
        cbkernels.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q)
    monkeypatch.delenv(pa_kernel.FAST_PATHS_ENV)
    assert pa_kernel.fast_paths_enabled()
    monkeypatch.setenv(pa_kernel.FAST_PATHS_ENV, "0")
    assert not pa_kernel.fast_paths_enabled()


@pytest.mark.parametrize("arch", sorted(tiles.TILES))
def test_wide_decode_tile_picked_for_17_to_32_rows(arch):
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            for q_len, group in ((1, 17), (1, 32), (2, 16), (4, 8)):
                assert tiles.pick_tile(arch, dtype, head_dim, q_len, group).block_m == tiles.WIDE_DECODE_BLOCK_M
            assert tiles.pick_tile(arch, dtype, head_dim, 1, 16).block_m == tiles.DECODE_BLOCK_M
            assert tiles.pick_tile(arch, dtype, head_dim, 1, 33).block_m > tiles.WIDE_DECODE_BLOCK_M
        # D = 256 and fp32 keep the prefill tile for these rows.
        assert tiles.tile_kind(arch, dtype, 256, 1, 32)[0] == "prefill"
    assert tiles.tile_kind(arch, torch.float32, 64, 1, 32)[0] == "prefill"


@given(group=st.sampled_from([17, 24, 32, 16, 8]), hkv=st.sampled_from([1, 2]),
       kv=st.lists(st.integers(1, 150), min_size=1, max_size=3), two_tokens=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), d=st.sampled_from([64, 96, 128]),
       window=st.none() | st.integers(1, 90), sinks=st.booleans(), fast=st.sampled_from(["0", "1"]),
       seed=st.integers(0, 2**16))
def test_wide_decode_batches_match_reference(group, hkv, kv, two_tokens, dtype, d, window, sinks, fast, seed):
    q_len = 2 if two_tokens and group <= 16 else 1
    lengths = [(q_len, max(k, q_len)) for k in kv]
    hq = group * hkv
    b = _batch(lengths, hq=hq, hkv=hkv, d=d, dtype=dtype, seed=seed)
    rows = q_len * group
    assert (tiles.pick_tile(tiles.INTERPRETER_ARCH, dtype, d, q_len, group).block_m == tiles.WIDE_DECODE_BLOCK_M) \
        == (16 < rows <= 32)
    gen = torch.Generator().manual_seed(seed)
    options = dict(sliding_window=window,
                   sinks=(torch.randn(hq, generator=gen) * 2).to(dtype).to(DEVICE) if sinks else None)
    with pytest.MonkeyPatch.context() as mp:
        out, lse = _run(b, mp, fast, **options)
    ref_out, ref_lse = reference(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q,
                                 return_lse=True, **options)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)

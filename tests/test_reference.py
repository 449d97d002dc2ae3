"""The references themselves, checked against independent PyTorch implementations:
SDPA on gathered K/V, and FlexAttention straight on the paged cache."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import cbkernels.reference as ref
from cbkernels.testing import make_paged_batch

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# fp32 inputs; the reference computes in fp64, the peers in fp32.
PEER_TOLERANCE = 1e-5

lengths_strategy = st.lists(
    st.integers(1, 40).flatmap(lambda kv: st.tuples(st.integers(0, kv), st.just(kv))), min_size=1, max_size=4
)


def _batch(lengths, hq=4, hkv=2, dim=16, block_size=4, seed=0):
    return make_paged_batch(lengths, num_q_heads=hq, num_kv_heads=hkv, head_dim=dim, block_size=block_size, seed=seed)


@given(lengths=lengths_strategy, group=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000))
def test_reference_matches_sdpa_on_gathered_kv(lengths, group, seed):
    batch = _batch(lengths, hq=2 * group, hkv=2, seed=seed)
    keys, values, cu_k = ref.gather_kv(batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens)
    out = ref.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                              batch.cu_seqlens_q)
    cu_q = batch.cu_seqlens_q.tolist()
    for b, (n_q, kv) in enumerate(lengths):
        if n_q == 0:
            continue
        q = batch.q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None]
        k = keys[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        v = values[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        mask = torch.arange(kv)[None, :] <= torch.arange(kv - n_q, kv)[:, None]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], expected, atol=PEER_TOLERANCE, rtol=PEER_TOLERANCE)


def _flex_on_paged_cache(batch, lengths, *, sliding_window=None, softcap=None):
    """FlexAttention over the whole flattened cache, a mask_mod mapping each slot to its owner."""
    num_blocks, block_size, hkv, dim = batch.k_cache.shape
    num_slots = num_blocks * block_size
    owner = torch.full((num_slots,), -1, dtype=torch.int64)
    position = torch.full((num_slots,), -1, dtype=torch.int64)
    for b, (_, kv) in enumerate(lengths):
        pos = torch.arange(kv)
        slots = batch.block_tables[b, pos // block_size].long() * block_size + pos % block_size
        # A shared prefix block belongs to several sequences; the builder shares none here.
        owner[slots], position[slots] = b, pos
    q_seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor([q for q, _ in lengths]))
    q_pos = torch.cat([torch.arange(kv - q, kv) for q, kv in lengths])

    def mask_mod(b, h, q_idx, kv_idx):
        visible = (owner[kv_idx] == q_seq[q_idx]) & (position[kv_idx] <= q_pos[q_idx])
        if sliding_window is not None:
            visible = visible & (position[kv_idx] > q_pos[q_idx] - sliding_window)
        return visible

    def score_mod(score, b, h, q_idx, kv_idx):
        return score if softcap is None else softcap * torch.tanh(score / softcap)

    total_q = batch.q.shape[0]
    block_mask = create_block_mask(mask_mod, None, None, total_q, num_slots, device="cpu", BLOCK_SIZE=block_size)
    # Unowned slots hold NaN poison; FlexAttention computes whole tiles, so zero them for it.
    k = torch.nan_to_num(batch.k_cache).view(num_slots, hkv, dim).transpose(0, 1)[None]
    v = torch.nan_to_num(batch.v_cache).view(num_slots, hkv, dim).transpose(0, 1)[None]
    q = batch.q.transpose(0, 1)[None]
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)


@pytest.mark.parametrize("options", [{}, {"sliding_window": 5}, {"softcap": 2.0}, {"sliding_window": 3, "softcap": 1.5}])
def test_reference_matches_flex_attention_on_the_paged_cache(options):
    lengths = [(1, 13), (5, 18), (0, 7), (9, 9), (3, 30)]
    batch = _batch(lengths, hq=4, hkv=2, dim=16, block_size=4, seed=7)
    batch.q *= 3  # larger logits make softcap matter
    expected = _flex_on_paged_cache(batch, lengths, **options)
    out = ref.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                              batch.cu_seqlens_q, **options)
    torch.testing.assert_close(out, expected, atol=PEER_TOLERANCE, rtol=PEER_TOLERANCE)


def test_sinks_rescale_the_output_by_the_softmax_mass_they_take():
    """With a sink logit s, out = out_without * exp(lse_without - lse), lse = logaddexp(lse_without, s)."""
    lengths = [(2, 11), (1, 5)]
    batch = _batch(lengths, seed=3)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.cu_seqlens_q)
    plain, lse_plain = ref.paged_attention(*args, return_lse=True)
    sunk, lse_sunk = ref.paged_attention(*args, sinks=sinks, return_lse=True)
    torch.testing.assert_close(lse_sunk, torch.logaddexp(lse_plain, sinks[None, :]))
    torch.testing.assert_close(sunk, plain * torch.exp(lse_plain - lse_sunk)[..., None], atol=1e-6, rtol=1e-5)


def test_reference_honours_out_and_scale():
    lengths = [(3, 8)]
    batch = _batch(lengths, seed=1)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.cu_seqlens_q)
    out = torch.empty_like(batch.q)
    result = ref.paged_attention(*args, out=out, scale=0.5)
    assert result is out
    torch.testing.assert_close(out, ref.paged_attention(batch.q * (0.5 / 16**-0.5), *args[1:]))

"""FP8 KV caches (float8_e4m3fn, float8_e5m2): quantize on write, dequantize on read.

Every kernel result is compared with the float64 oracle of the DEQUANTIZED cache
(``stored * scale``), so the tolerances are the usual per-dtype ones of the query dtype: the
quantization error itself is the engine's concern (docs/fp8.md), not the kernels'. Caches are
poisoned as in tests/test_paged_attention.py: NaN survives quantization (NaN in both formats),
so a dropped mask still shows up as NaN.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import cbkernels
from cbkernels.ops import torch_path
from cbkernels.reference import kv_cache as ref_kv
from cbkernels.reference.paged_attention import paged_attention as reference
from cbkernels.testing import assert_bits_equal, assert_close, make_paged_batch

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
Q_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_SIZES = (1, 2, 3, 4, 8)
MIXED = [(1, 37), (6, 29), (11, 11), (0, 9), (1, 1)]


def _scales(hkv: int, per_head: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if per_head:
        k, v = torch.rand(hkv, generator=gen) * 0.05 + 0.002, torch.rand(hkv, generator=gen) * 0.05 + 0.002
    else:
        k, v = torch.rand((), generator=gen) * 0.05 + 0.002, torch.rand((), generator=gen) * 0.05 + 0.002
    return k.float().to(DEVICE), v.float().to(DEVICE)


def _fp8_batch(lengths, fmt, q_dtype, *, hq=4, hkv=2, d=64, block=16, shared=0, seed=0, per_head=True):
    b = make_paged_batch(list(lengths), num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block,
                         dtype=torch.float32, device=DEVICE, shared_prefix_blocks=shared, seed=seed)
    k_scale, v_scale = _scales(hkv, per_head, seed)
    b.k_cache = ref_kv.quantize(b.k_cache, k_scale, fmt)
    b.v_cache = ref_kv.quantize(b.v_cache, v_scale, fmt)
    b.q = b.q.to(q_dtype)
    return b, k_scale, v_scale


def _args(b):
    return (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q)


def _check(b, k_scale, v_scale, *, splits=None, host_bounds=True, **options):
    bounds = dict(max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k) if host_bounds else {}
    out, lse = cbkernels.paged_attention(*_args(b), return_lse=True, num_splits=splits, k_scale=k_scale,
                                         v_scale=v_scale, **bounds, **options)
    ref_out, ref_lse = reference(*_args(b), return_lse=True, k_scale=k_scale, v_scale=v_scale, **options)
    assert out.dtype == b.q.dtype and out.shape == b.q.shape
    assert_close(out, ref_out, b.q.dtype)
    assert_close(lse, ref_lse, b.q.dtype)


# --------------------------------------------------------------------------- quantize / scatter
@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("src", Q_DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["tensor", "head"])
def test_scatter_quantizes_bit_exactly(fmt, src, per_head):
    """value / scale, saturated, ties to even: bit-identical to the reference (and to torch's cast),
    with values past the finite range, tiny subnormal values, signed zeros and skipped rows."""
    gen = torch.Generator().manual_seed(3)
    t, hkv, d, nb, bs = 21, 2, 40, 6, 4
    key = (torch.randn(t, hkv, d, generator=gen) * torch.logspace(-4, 3, d)).to(src)
    value = (torch.randn(t, hkv, d, generator=gen) * 10).to(src)
    key[0, 0, :4] = torch.tensor([1e30 if src == torch.float32 else 6e4, -6e4, 0.0, -0.0]).to(src)
    k_scale, v_scale = _scales(hkv, per_head, 5)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[[2, 9]] = -1
    caches = [torch.full((nb, bs, hkv, d), float("nan")).to(fmt) for _ in range(4)]
    k_cache, v_cache, k_ref, v_ref = [c.to(DEVICE) for c in caches]
    args = (key.to(DEVICE), value.to(DEVICE))
    cbkernels.scatter_kv(*args, k_cache, v_cache, slots.to(DEVICE), k_scale=k_scale, v_scale=v_scale)
    ref_kv.scatter_kv(*args, k_ref, v_ref, slots.to(DEVICE), k_scale=k_scale, v_scale=v_scale)
    assert_bits_equal(k_cache, k_ref)
    assert_bits_equal(v_cache, v_ref)
    limit = ref_kv.FP8_MAX[fmt]
    written = k_cache.view(-1, hkv, d)[slots[0]].float()
    assert written[0, 0] == limit and written[0, 1] == -limit  # saturated, not NaN / inf
    assert torch.isnan(k_cache.view(-1, hkv, d)[[s for s in range(nb * bs) if s not in slots.tolist()]].float()).all()


@pytest.mark.parametrize("fmt", FP8, ids=str)
def test_torch_path_quantizes_like_the_reference(fmt):
    gen = torch.Generator().manual_seed(4)
    key, value = torch.randn(9, 2, 16, generator=gen) * 30, torch.randn(9, 2, 16, generator=gen)
    k_scale, v_scale = _scales(2, True, 1)
    slots = torch.tensor([0, 3, -1, 7, 8, 12, 15, 1, 2])
    out = [torch.zeros(4, 4, 2, 16, dtype=fmt) for _ in range(4)]
    torch_path.scatter_kv(key, value, out[0], out[1], slots, k_scale.cpu(), v_scale.cpu())
    ref_kv.scatter_kv(key, value, out[2], out[3], slots, k_scale=k_scale.cpu(), v_scale=v_scale.cpu())
    assert_bits_equal(out[0], out[2])
    assert_bits_equal(out[1], out[3])


# --------------------------------------------------------------------------- gather / copy
@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=str)
def test_gather_dequantizes(fmt, dtype):
    b, k_scale, v_scale = _fp8_batch([(1, 37), (3, 9), (0, 0), (2, 20)], fmt, torch.float32, hkv=2, d=80, seed=2)
    got = cbkernels.gather_kv(b.k_cache, b.v_cache, b.block_tables, b.seq_lens, k_scale=k_scale, v_scale=v_scale,
                              dtype=dtype)
    want = ref_kv.gather_kv(b.k_cache, b.v_cache, b.block_tables, b.seq_lens, k_scale=k_scale, v_scale=v_scale,
                            dtype=dtype)
    assert got[0].dtype == (dtype or torch.float32)
    for g, w in zip(got, want):  # one rounding of an exact product: bit-identical
        assert_bits_equal(g, w)
    cpu = [t.cpu() for t in (b.k_cache, b.v_cache, b.block_tables, b.seq_lens)]
    fallback = torch_path.gather_kv(*cpu, k_scale.cpu(), v_scale.cpu(), dtype)
    for g, w in zip(fallback, want):
        assert_bits_equal(g, w.cpu())


@pytest.mark.parametrize("fmt", FP8, ids=str)
def test_copy_blocks_moves_fp8_bits(fmt):
    gen = torch.Generator().manual_seed(6)
    k = (torch.randn(6, 4, 2, 16, generator=gen) * 100).to(fmt).to(DEVICE)
    v = (torch.randn(6, 4, 2, 16, generator=gen) * 100).to(fmt).to(DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    mapping = torch.tensor([[0, 3], [5, 1]], device=DEVICE)
    cbkernels.copy_blocks(k, v, mapping)
    ref_kv.copy_blocks(k_ref, v_ref, mapping)
    assert_bits_equal(k, k_ref)
    assert_bits_equal(v, v_ref)


# --------------------------------------------------------------------------- attention
@st.composite
def fp8_batches(draw):
    lengths = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["decode", "chunk", "prefill", "empty"]))
        if kind == "decode":
            lengths.append((1, draw(st.integers(1, 80))))
        elif kind == "chunk":
            q_len = draw(st.integers(2, 10))
            lengths.append((q_len, q_len + draw(st.integers(1, 50))))
        elif kind == "prefill":
            q_len = draw(st.integers(1, 20))
            lengths.append((q_len, q_len))
        else:
            lengths.append((0, draw(st.integers(0, 20))))
    hkv = draw(st.sampled_from([1, 2]))
    return dict(lengths=lengths, hq=hkv * draw(st.sampled_from(GROUP_SIZES)), hkv=hkv,
                d=draw(st.sampled_from([64, 80])), block=draw(st.sampled_from([8, 16, 32])),
                fmt=draw(st.sampled_from(FP8)), q_dtype=draw(st.sampled_from(Q_DTYPES)),
                shared=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**16)), per_head=draw(st.booleans()))


@st.composite
def option_sets(draw):
    return dict(sliding_window=draw(st.none() | st.integers(1, 40)),
                softcap=draw(st.none() | st.sampled_from([1.0, 5.0, 30.0])),
                sinks=draw(st.booleans()), scale=draw(st.none() | st.floats(0.02, 0.5)))


@given(spec=fp8_batches(), options=option_sets(), splits=st.sampled_from([None, 1, 3]), host_bounds=st.booleans())
@example(spec=dict(lengths=MIXED, hq=8, hkv=2, d=64, block=16, fmt=torch.float8_e4m3fn, q_dtype=torch.float16,
                   shared=1, seed=3, per_head=True),
         options=dict(sliding_window=7, softcap=5.0, sinks=True, scale=None), splits=3, host_bounds=True)
@example(spec=dict(lengths=MIXED, hq=4, hkv=1, d=80, block=8, fmt=torch.float8_e5m2, q_dtype=torch.bfloat16,
                   shared=0, seed=4, per_head=False),
         options=dict(sliding_window=None, softcap=None, sinks=False, scale=None), splits=None, host_bounds=False)
def test_mixed_batches_match_dequantized_oracle(spec, options, splits, host_bounds):
    spec = dict(spec)
    fmt, q_dtype = spec.pop("fmt"), spec.pop("q_dtype")
    b, k_scale, v_scale = _fp8_batch(spec.pop("lengths"), fmt, q_dtype, **spec)
    options = dict(options)
    if options["sinks"]:
        gen = torch.Generator().manual_seed(1)
        options["sinks"] = (torch.randn(spec["hq"], generator=gen) * 2).to(q_dtype).to(DEVICE)
    else:
        options["sinks"] = None
    _check(b, k_scale, v_scale, splits=splits, host_bounds=host_bounds, **options)


@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("q_dtype", Q_DTYPES, ids=str)
def test_torch_path_attention_matches_dequantized_oracle(fmt, q_dtype):
    b, k_scale, v_scale = _fp8_batch(MIXED, fmt, q_dtype, hq=4, hkv=2, seed=7)
    cpu = [t.cpu() for t in _args(b)]
    out = torch.empty_like(cpu[0])
    lse = torch.empty(cpu[0].shape[:2], dtype=torch.float32)
    torch_path.paged_attention(*cpu, out, lse, scale=0.125, sliding_window=9, softcap=None, sinks=None,
                               k_scale=k_scale.cpu(), v_scale=v_scale.cpu())
    ref_out, ref_lse = reference(*cpu, scale=0.125, sliding_window=9, return_lse=True, k_scale=k_scale.cpu(),
                                 v_scale=v_scale.cpu())
    assert_close(out, ref_out, q_dtype)
    assert_close(lse, ref_lse, q_dtype)


# --------------------------------------------------------------------------- argument errors
def _valid(fmt=torch.float8_e4m3fn):
    return _fp8_batch([(1, 9), (2, 5)], fmt, torch.float16, seed=1)


@pytest.mark.parametrize("missing", ["k_scale", "v_scale"])
def test_fp8_cache_without_scales_names_the_argument(missing):
    b, k_scale, v_scale = _valid()
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    scales[missing] = None
    with pytest.raises(ValueError, match=missing):
        cbkernels.paged_attention(*_args(b), **scales)
    with pytest.raises(ValueError, match=missing):
        cbkernels.gather_kv(b.k_cache, b.v_cache, b.block_tables, b.seq_lens, **scales)
    key = torch.zeros(2, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=missing):
        cbkernels.scatter_kv(key, key, b.k_cache, b.v_cache, torch.tensor([0, 1], device=DEVICE), **scales)


@pytest.mark.parametrize("name", ["k_scale", "v_scale"])
def test_scales_on_a_non_fp8_cache_name_the_argument(name):
    b = make_paged_batch([(1, 9)], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, device=DEVICE)
    scale = {name: torch.ones((), device=DEVICE)}
    with pytest.raises(ValueError, match=name):
        cbkernels.paged_attention(*_args(b), **scale)
    with pytest.raises(ValueError, match=name):
        cbkernels.gather_kv(b.k_cache, b.v_cache, b.block_tables, b.seq_lens, **scale)
    with pytest.raises(ValueError, match=name):
        cbkernels.scatter_kv(b.q[:, :2], b.q[:, :2], b.k_cache, b.v_cache, torch.tensor([0], device=DEVICE), **scale)
    with pytest.raises(ValueError, match="dtype"):
        cbkernels.gather_kv(b.k_cache, b.v_cache, b.block_tables, b.seq_lens, dtype=torch.float16)


@pytest.mark.parametrize("bad, match", [
    (lambda s: s.double(), "k_scale must be float32"),
    (lambda s: torch.ones(3, device=DEVICE), r"k_scale must be \[\] \(per tensor\) or \[2\]"),
    (lambda s: -s, "k_scale must hold positive finite values"),
    (lambda s: s * float("inf"), "k_scale must hold positive finite values"),
    (lambda s: s[0], "v_scale must have the shape of k_scale"),
])
def test_bad_scales_are_refused(bad, match):
    b, k_scale, v_scale = _valid()
    with pytest.raises(ValueError, match=match):
        cbkernels.paged_attention(*_args(b), k_scale=bad(k_scale), v_scale=v_scale)

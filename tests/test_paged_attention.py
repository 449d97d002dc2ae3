"""Paged attention (Triton kernel) against the float64 reference.

On a CPU-only machine the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET);
on CUDA the same tests exercise the compiled kernel. Every cache is poisoned (NaN in each slot no
sequence owns, shuffled fragmented tables, garbage past each row's last used entry), so a
missing mask shows up as NaN. Shapes stay small: the interpreter costs ~3.5 ms per
(program x KV tile) and ~8 ms per launch (docs/verification.md).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import cbkernels
import cbkernels.kernels.paged_attention as pa_kernel
from cbkernels.ops import torch_path as _torch_ops
from cbkernels.reference.paged_attention import paged_attention as reference
from cbkernels.testing import TOLERANCES, assert_close, make_paged_batch

# Empty split-KV segments take log2(0) = -inf on purpose; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims and block sizes the contract promises (README, Kernel API), each run as a fixed small case.
HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
# Validation also admits these (any power of two in [1, 1024]); the kernel gathers per key.
EXTRA_BLOCK_SIZES = (1, 2, 4, 512, 1024)
# Query heads per KV head: 1 (MHA) .. 16, non-powers of two included; Hkv = 1 is MQA.
GROUP_SIZES = (1, 2, 3, 4, 5, 8, 16)
# The awkward (q_len, kv_len) pairs kept as fixed examples (vLLM's kernel tests use them).
AWKWARD_LENGTHS = ((1, 1328), (5, 18), (129, 463))
# A batch with every kind of sequence: decode, chunked prefill over a cached prefix, whole
# prefill, a zero-row sequence, and a one-token whole prefill.
MIXED = [(1, 37), (6, 29), (11, 11), (0, 9), (1, 1)]


def _batch(lengths, *, hq=4, hkv=2, d=64, block=16, dtype=torch.float32, shared=0, seed=0):
    return make_paged_batch(list(lengths), num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=block,
                            dtype=dtype, device=DEVICE, shared_prefix_blocks=shared, seed=seed)


def _args(b):
    return (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.cu_seqlens_q)


def _check(b, *, splits=None, host_bounds=True, monkeypatch=None, **options):
    """Run the kernel (forcing ``splits`` segments when given) and compare out and lse."""
    bounds = dict(max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k) if host_bounds else {}
    out, lse = cbkernels.paged_attention(*_args(b), return_lse=True, num_splits=splits, **bounds, **options)
    ref_out, ref_lse = reference(*_args(b), return_lse=True, **options)
    assert out.dtype == b.q.dtype and out.shape == b.q.shape
    assert lse.dtype == torch.float32 and lse.shape == b.q.shape[:2]
    assert_close(out, ref_out, b.q.dtype)
    # lse is fp32 from inputs of the q dtype: the same per-dtype tolerance applies.
    assert_close(lse, ref_lse, b.q.dtype)
    return out, lse


def _sinks(hq, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(hq, generator=gen) * 2).to(dtype).to(DEVICE)


# --------------------------------------------------------------------------- hypothesis
@st.composite
def batches(draw):
    n_seqs = draw(st.integers(1, 4))
    lengths = []
    for _ in range(n_seqs):
        kind = draw(st.sampled_from(["decode", "chunk", "prefill", "empty"]))
        if kind == "decode":
            lengths.append((1, draw(st.integers(1, 90))))
        elif kind == "chunk":
            q_len = draw(st.integers(2, 12))
            lengths.append((q_len, q_len + draw(st.integers(1, 60))))
        elif kind == "prefill":
            q_len = draw(st.integers(1, 24))
            lengths.append((q_len, q_len))
        else:
            lengths.append((0, draw(st.integers(0, 20))))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from(GROUP_SIZES))
    return dict(
        lengths=lengths, hq=hkv * group, hkv=hkv, d=draw(st.sampled_from([64, 80])),
        block=draw(st.sampled_from([8, 16, 32])), dtype=draw(st.sampled_from(DTYPES)),
        shared=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def option_sets(draw):
    return dict(
        sliding_window=draw(st.none() | st.integers(1, 40)),
        softcap=draw(st.none() | st.sampled_from([1.0, 5.0, 30.0])),
        sinks=draw(st.booleans()),
        scale=draw(st.none() | st.floats(0.02, 0.5)),
    )


@given(spec=batches(), options=option_sets(), splits=st.sampled_from([None, 1, 2, 3]),
       host_bounds=st.booleans())
@example(spec=dict(lengths=MIXED, hq=8, hkv=2, d=64, block=16, dtype=torch.float16, shared=1, seed=3),
         options=dict(sliding_window=7, softcap=5.0, sinks=True, scale=None), splits=3, host_bounds=True)
def test_mixed_batches_match_reference(spec, options, splits, host_bounds):
    b = _batch(spec["lengths"], hq=spec["hq"], hkv=spec["hkv"], d=spec["d"], block=spec["block"],
               dtype=spec["dtype"], shared=spec["shared"], seed=spec["seed"])
    options = dict(options)
    options["sinks"] = _sinks(spec["hq"], spec["dtype"]) if options["sinks"] else None
    _check(b, splits=splits, host_bounds=host_bounds, **options)


@given(head_dim=st.sampled_from(HEAD_DIMS), block=st.sampled_from(BLOCK_SIZES), dtype=st.sampled_from(DTYPES),
       q_len=st.integers(1, 20), prefix=st.integers(0, 300), splits=st.sampled_from([None, 2]),
       window=st.none() | st.integers(1, 200), seed=st.integers(0, 2**16))
def test_head_dims_and_block_sizes_drawn(head_dim, block, dtype, q_len, prefix, splits, window, seed):
    """One chunk over a cached prefix next to a decode: KV tiles spanning several blocks or part of one."""
    b = _batch([(q_len, q_len + prefix), (1, prefix + 1)], hq=4, hkv=2, d=head_dim, block=block, dtype=dtype,
               seed=seed)
    _check(b, splits=splits, sliding_window=window)


# --------------------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", AWKWARD_LENGTHS, ids=str)
@pytest.mark.parametrize("splits", [None, 4], ids=["heuristic", "split4"])
def test_awkward_lengths(lengths, dtype, splits):
    _check(_batch([lengths], hq=2, hkv=1, dtype=dtype, block=16), splits=splits)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dims(head_dim, dtype):
    _check(_batch(MIXED, hq=4, hkv=2, d=head_dim, dtype=dtype))


@pytest.mark.parametrize("head_dim", [16, 40])
def test_small_head_dims_run_on_padded_tiles(head_dim):
    _check(_batch(MIXED, hq=2, hkv=1, d=head_dim))


@pytest.mark.parametrize("block_size", BLOCK_SIZES + EXTRA_BLOCK_SIZES)
def test_block_sizes(block_size):
    # Spans several blocks per KV tile (small blocks) and part of one block (large blocks).
    _check(_batch([(1, 300), (7, 90), (0, 3)], hq=4, hkv=2, block=block_size, dtype=torch.float16))


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("group", GROUP_SIZES)
def test_gqa_and_mqa_ratios(group, hkv):
    _check(_batch(MIXED, hq=hkv * group, hkv=hkv, dtype=torch.float16))


OPTION_CASES = {
    "none": {},
    "scale": dict(scale=0.3),
    "window1": dict(sliding_window=1),
    "window": dict(sliding_window=9),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=12, softcap=10.0, sinks=True, scale=0.2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
def test_options(case, dtype, splits):
    options = dict(OPTION_CASES[case])
    if options.get("sinks"):
        options["sinks"] = _sinks(4, dtype)
    _check(_batch(MIXED + [(2, 120)], hq=4, hkv=2, dtype=dtype, shared=1), splits=splits, **options)


def test_heuristic_splits_long_decodes():
    """Few long decodes leave SMs idle: the heuristic must split them, and the result still match."""
    b = _batch([(1, 1100), (1, 700)], hq=4, hkv=1, dtype=torch.float16)
    programs = pa_kernel.num_virtual_tiles(2, 2, 4, pa_kernel.DECODE_BLOCK_M, 1) * 1
    assert pa_kernel.pick_num_splits(programs, 1100, pa_kernel.INTERPRETER_SM_COUNT, 1) > 1
    assert pa_kernel.pick_num_splits(100_000, 1100, pa_kernel.INTERPRETER_SM_COUNT, 1) == 1
    assert pa_kernel.pick_num_splits(programs, 200, pa_kernel.INTERPRETER_SM_COUNT, 1) == 1
    _check(b)


def test_softcap_is_safe_for_huge_logits():
    """tanh from exp2 of a non-positive argument: logits of 1e4 must not overflow into NaN."""
    b = _batch([(3, 40), (1, 17)], hq=2, hkv=1)
    b.q.mul_(300.0)
    _check(b, softcap=1.5, scale=1.0)


def test_huge_sinks_do_not_overflow():
    b = _batch([(3, 40), (1, 17)], hq=2, hkv=1)
    sinks = torch.tensor([90.0, -90.0], device=DEVICE)
    _check(b, sinks=sinks)
    _check(b, sinks=sinks, splits=2)


def test_sliding_window_never_reads_tiles_outside_it():
    """Poison (NaN) every key far enough below the window that no visited KV tile holds it."""
    window = 100
    b = _batch([(1, 600), (3, 450)], hq=2, hkv=1)
    widest_tile = 64  # every BLOCK_N in pa_kernel.TILES divides 64
    for seq, (q_len, kv_len) in enumerate([(1, 600), (3, 450)]):
        first_visible = kv_len - q_len - window + 1
        never_read = (first_visible // widest_tile) * widest_tile
        for pos in range(never_read):
            block = int(b.block_tables[seq, pos // 16])
            b.k_cache[block, pos % 16] = float("nan")
            b.v_cache[block, pos % 16] = float("nan")
    for splits in (1, 3):
        out = cbkernels.paged_attention(*_args(b), sliding_window=window, num_splits=splits)
        assert not torch.isnan(out).any()
        # The reference reads every key (NaN * 0 = NaN), so compare on a clean copy.
    clean = _batch([(1, 600), (3, 450)], hq=2, hkv=1)
    _check(clean, sliding_window=window)


def test_out_is_honoured_and_returned():
    b = _batch(MIXED, dtype=torch.float16)
    out = torch.full_like(b.q, float("nan"))
    result = cbkernels.paged_attention(*_args(b), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, reference(*_args(b)), torch.float16)
    result, lse = cbkernels.paged_attention(*_args(b), out=out, return_lse=True)
    assert result.data_ptr() == out.data_ptr() and lse.shape == b.q.shape[:2]


def test_launcher_uses_the_callers_workspace():
    """Split partials go to the workspace the caller passes (as the engine's CUDA graphs
    need); a workspace too small for the launch is refused before anything runs."""
    b = _batch([(1, 300), (2, 90)], hq=4, hkv=2, dtype=torch.float32)
    plan = pa_kernel.plan_launch(b.q.device, b.q.dtype, b.q.shape[0], 2, 4, 2, 64, b.max_seqlen_q,
                                 b.max_seqlen_k, num_splits=3)
    numel = plan.workspace_numel(b.q.shape[0], 4)
    assert numel > 0
    workspace = torch.full((numel + 5,), float("nan"))
    out = torch.empty_like(b.q)
    launch = dict(scale=64 ** -0.5, sliding_window=None, softcap=None, sinks=None,
                  max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k, num_splits=3)
    pa_kernel.launch_paged_attention(*_args(b), out, None, workspace=workspace, **launch)
    assert_close(out, reference(*_args(b)))
    assert not torch.isnan(workspace[:numel]).all() and torch.isnan(workspace[numel:]).all()
    with pytest.raises(ValueError, match="workspace"):
        pa_kernel.launch_paged_attention(*_args(b), out, None, workspace=workspace[:numel - 1], **launch)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, pa_kernel.MAX_SPLITS + 1])
def test_num_splits_must_be_a_valid_count(bad):
    b = _batch(MIXED)
    with pytest.raises(ValueError, match="num_splits"):
        cbkernels.paged_attention(*_args(b), num_splits=bad)


@pytest.mark.parametrize("seq_dtype, cu_dtype", [(torch.int64, torch.int64), (torch.int32, torch.int64),
                                                   (torch.int64, torch.int32)])
def test_int64_and_mixed_index_dtypes(seq_dtype, cu_dtype):
    """The CUDA-graph buffers hand int64 lengths to the kernel: any mix gives the same answer."""
    b = _batch(MIXED, dtype=torch.float16)
    args = list(_args(b))
    expected = reference(*args)
    args[4], args[5] = b.seq_lens.to(seq_dtype), b.cu_seqlens_q.to(cu_dtype)
    assert_close(cbkernels.paged_attention(*args), expected, torch.float16)
    assert_close(cbkernels.paged_attention(*args, max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k),
                 expected, torch.float16)


def test_all_rows_empty_is_a_no_op():
    b = _batch([(0, 5), (0, 9)])
    out = cbkernels.paged_attention(*_args(b))
    assert out.shape == (0, 4, 64)


def test_cache_over_2_31_elements_uses_int64_offsets():
    """Blocks placed past element 2**31 of an fp16 cache. Only the used blocks are ever written,
    so the rest of the (lazily allocated) 4 GiB cache costs no memory on CPU."""
    hkv, d, block = 1, 64, 256
    block_elems = block * hkv * d
    num_blocks = (2**31) // block_elems + 4
    try:
        k_cache = torch.empty(num_blocks, block, hkv, d, dtype=torch.float16, device=DEVICE)
        v_cache = torch.empty(num_blocks, block, hkv, d, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve two 4 GiB caches here")
    gen = torch.Generator().manual_seed(0)
    used = [num_blocks - 1, num_blocks - 3, 5]  # two blocks past 2**31 elements, one below
    for blk in used:
        k_cache[blk] = torch.randn(block, hkv, d, generator=gen).to(torch.float16)
        v_cache[blk] = torch.randn(block, hkv, d, generator=gen).to(torch.float16)
    kv_len = 3 * block - 17
    block_tables = torch.tensor([used + [-1]], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([kv_len], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 2, d, generator=gen).to(torch.float16).to(DEVICE)
    args = (q, k_cache, v_cache, block_tables, seq_lens, cu)
    assert_close(cbkernels.paged_attention(*args), reference(*args), torch.float16)


# --------------------------------------------------------------------------- CPU torch fallback
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["none", "window", "all"])
def test_torch_fallback_matches_reference(case, dtype):
    b = make_paged_batch(MIXED, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
                         shared_prefix_blocks=1)
    options = dict(OPTION_CASES[case])
    if options.get("sinks"):
        options["sinks"] = _sinks(4, dtype).cpu()
    scale = options.pop("scale", None) or 64**-0.5
    out = torch.empty_like(b.q)
    lse = torch.empty(b.q.shape[:2], dtype=torch.float32)
    _torch_ops.paged_attention(*_args(b), out, lse, scale=scale, sliding_window=options.get("sliding_window"),
                               softcap=options.get("softcap"), sinks=options.get("sinks"))
    ref_out, ref_lse = reference(*_args(b), return_lse=True, scale=scale, **options)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)
    out_sdpa = torch.empty_like(b.q)  # no lse: the SDPA branch
    _torch_ops.paged_attention(*_args(b), out_sdpa, None, scale=scale, sliding_window=options.get("sliding_window"),
                               softcap=options.get("softcap"), sinks=options.get("sinks"))
    assert_close(out_sdpa, ref_out, dtype)


# --------------------------------------------------------------------------- validation
def _valid():
    return _batch([(1, 20), (3, 9)], hq=4, hkv=2, dtype=torch.float16)


def _call(b, **overrides):
    args = dict(q=b.q, k_cache=b.k_cache, v_cache=b.v_cache, block_tables=b.block_tables,
                seq_lens=b.seq_lens, cu_seqlens_q=b.cu_seqlens_q)
    options = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return cbkernels.paged_attention(*args.values(), **options)


def _bad_cases():
    b = _valid()
    T, hq, d = b.q.shape
    return {
        "q dtype": ("q", dict(q=b.q.float())),
        "q int": ("q", dict(q=b.q.to(torch.int32))),
        "q shape": ("q", dict(q=b.q[:, 0])),
        "q non-contiguous": ("q", dict(q=b.q.transpose(0, 1).contiguous().transpose(0, 1))),
        "q on another device": ("q", dict(q=b.q.to("meta"))),
        "v_cache dtype": ("v_cache", dict(v_cache=b.v_cache.float())),
        "k_cache shape": ("k_cache", dict(k_cache=b.k_cache[..., :32].contiguous())),
        "k_cache non-contiguous": ("k_cache", dict(k_cache=b.k_cache.transpose(1, 2).contiguous().transpose(1, 2))),
        "heads not a multiple": ("KV heads", dict(q=torch.zeros(T, 3, d, dtype=b.q.dtype, device=DEVICE))),
        "head dim unsupported": ("head_dim", dict(
            q=torch.zeros(T, hq, 12, dtype=b.q.dtype, device=DEVICE),
            k_cache=torch.zeros(*b.k_cache.shape[:3], 12, dtype=b.q.dtype, device=DEVICE),
            v_cache=torch.zeros(*b.k_cache.shape[:3], 12, dtype=b.q.dtype, device=DEVICE))),
        "head dim too large": ("head_dim", dict(
            q=torch.zeros(T, hq, 512, dtype=b.q.dtype, device=DEVICE),
            k_cache=torch.zeros(*b.k_cache.shape[:3], 512, dtype=b.q.dtype, device=DEVICE),
            v_cache=torch.zeros(*b.k_cache.shape[:3], 512, dtype=b.q.dtype, device=DEVICE))),
        "block size not a power of two": ("block_size", dict(
            k_cache=torch.zeros(4, 12, 2, d, dtype=b.q.dtype, device=DEVICE),
            v_cache=torch.zeros(4, 12, 2, d, dtype=b.q.dtype, device=DEVICE))),
        "block table dtype": ("block_tables", dict(block_tables=b.block_tables.long())),
        "block table too narrow": ("block_tables", dict(block_tables=b.block_tables[:, :1].contiguous())),
        "block table entry out of range": ("block_tables", dict(
            block_tables=torch.full_like(b.block_tables, 10**6))),
        "seq_lens dtype": ("seq_lens", dict(seq_lens=b.seq_lens.float())),
        "seq_lens length": ("seq_lens", dict(seq_lens=b.seq_lens[:1])),
        "cu_seqlens_q end": ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE))),
        "cu_seqlens_q decreasing": ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32, device=DEVICE)[[0, 2, 1]].contiguous())),
        "cu_seqlens_q dtype": ("cu_seqlens_q", dict(cu_seqlens_q=b.cu_seqlens_q.float())),
        "more rows than keys": ("cu_seqlens_q", dict(seq_lens=torch.tensor([20, 2], dtype=torch.int32, device=DEVICE))),
        "scale negative": ("scale", dict(scale=-0.1)),
        "scale nan": ("scale", dict(scale=float("nan"))),
        "softcap zero": ("softcap", dict(softcap=0.0)),
        "softcap inf": ("softcap", dict(softcap=float("inf"))),
        "sliding_window zero": ("sliding_window", dict(sliding_window=0)),
        "sliding_window float": ("sliding_window", dict(sliding_window=2.5)),
        "sinks shape": ("sinks", dict(sinks=torch.zeros(3, device=DEVICE))),
        "sinks 2-D": ("sinks", dict(sinks=torch.zeros(1, hq, device=DEVICE))),
        "out shape": ("out", dict(out=torch.empty(T, hq, d // 2, dtype=b.q.dtype, device=DEVICE))),
        "out dtype": ("out", dict(out=torch.empty(T, hq, d, dtype=torch.float32, device=DEVICE))),
        "max_seqlen_q too small": ("max_seqlen_q", dict(max_seqlen_q=1)),
        "max_seqlen_k negative": ("max_seqlen_k", dict(max_seqlen_k=-1)),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error_naming_the_argument(case):
    match, overrides = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        _call(_valid(), **overrides)


def test_tolerance_table_is_the_shared_one():
    # The kernel must meet these as they are; a miss means the kernel is wrong.
    assert TOLERANCES == {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
    assert math.isclose(pa_kernel.LOG2E * pa_kernel.LN2, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_device_to_host_sync_when_bounds_are_given():
    """Contract: with max_seqlen_q / max_seqlen_k given, validation and launch never sync."""
    b = _batch(MIXED, dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cbkernels.paged_attention(*_args(b), max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, reference(*_args(b)), torch.float16)

"""scatter_kv / gather_kv / copy_blocks against their references.

Every cache starts poisoned with NaN, so a stray write or a dropped load mask shows up.
On a machine without CUDA the Triton kernels run interpreted (conftest sets TRITON_INTERPRET).
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import cbkernels
import cbkernels.reference as ref
from cbkernels.ops import torch_path as _torch_ops
from cbkernels.testing import assert_bits_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Non-powers of two on purpose: the kernels must mask rows, columns and blocks of any size.
BLOCK_SIZES = st.integers(1, 33)
NUM_KV_HEADS = st.integers(1, 5)
HEAD_DIMS = st.sampled_from([1, 3, 8, 16, 24, 64, 80, 96, 130])


def poisoned_cache(num_blocks, block_size, hkv, dim, dtype, gen):
    """A cache whose rows hold random data or NaN, so untouched slots are distinctive."""
    cache = torch.randn(num_blocks, block_size, hkv, dim, generator=gen).to(dtype)
    nan_rows = torch.rand(num_blocks, block_size, generator=gen) < 0.5
    cache[nan_rows] = float("nan")
    return cache.to(DEVICE)


def random_tables(seq_lens, block_size, num_blocks, gen):
    """Shuffled, fragmented block tables with garbage past each row's last used entry."""
    need = [math.ceil(n / block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need + [0]) + 2
    tables = torch.randint(-3, 10 * num_blocks, (len(seq_lens), width), generator=gen, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(perm[cursor:cursor + n], dtype=torch.int32)
        cursor += n
    return tables.to(DEVICE)


@st.composite
def scatter_cases(draw):
    block_size, hkv, dim = draw(BLOCK_SIZES), draw(NUM_KV_HEADS), draw(HEAD_DIMS)
    num_blocks = draw(st.integers(1, 6))
    num_slots = num_blocks * block_size
    num_tokens = draw(st.integers(0, min(num_slots, 40)))
    skipped = draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens))
    return dict(block_size=block_size, hkv=hkv, dim=dim, num_blocks=num_blocks, skipped=skipped,
                dtype=draw(st.sampled_from(DTYPES)), index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                seed=draw(st.integers(0, 2**31 - 1)))


@given(scatter_cases())
@example(dict(block_size=16, hkv=8, dim=128, num_blocks=3, skipped=[False] * 40, dtype=torch.bfloat16,
              index_dtype=torch.int64, seed=1))
def test_scatter_matches_reference_and_leaves_other_slots_untouched(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["num_blocks"], case["block_size"], case["hkv"], case["dim"])
    k_cache = poisoned_cache(*shape, case["dtype"], gen)
    v_cache = poisoned_cache(*shape, case["dtype"], gen)
    num_tokens = len(case["skipped"])
    slots = torch.randperm(shape[0] * shape[1], generator=gen)[:num_tokens]
    slots[torch.tensor(case["skipped"], dtype=torch.bool)] = -1
    slots = slots.to(case["index_dtype"]).to(DEVICE)
    key = torch.randn(num_tokens, case["hkv"], case["dim"], generator=gen).to(case["dtype"]).to(DEVICE)
    value = torch.randn(num_tokens, case["hkv"], case["dim"], generator=gen).to(case["dtype"]).to(DEVICE)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    ref.scatter_kv(key, value, k_expected, v_expected, slots)
    cbkernels.scatter_kv(key, value, k_cache, v_cache, slots)
    assert_bits_equal(k_cache, k_expected)
    assert_bits_equal(v_cache, v_expected)


@st.composite
def paged_cases(draw):
    block_size, hkv, dim = draw(BLOCK_SIZES), draw(NUM_KV_HEADS), draw(HEAD_DIMS)
    seq_lens = draw(st.lists(st.integers(0, 3 * block_size + 5), min_size=0, max_size=5))
    spare = draw(st.integers(1, 3))  # blocks no sequence owns: they stay NaN
    return dict(block_size=block_size, hkv=hkv, dim=dim, seq_lens=seq_lens, spare=spare,
                dtype=draw(st.sampled_from(DTYPES)), lens_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _paged_setup(case):
    gen = torch.Generator().manual_seed(case["seed"])
    bs = case["block_size"]
    num_blocks = sum(math.ceil(n / bs) for n in case["seq_lens"]) + case["spare"]
    shape = (num_blocks, bs, case["hkv"], case["dim"])
    k_cache = torch.full(shape, float("nan"), dtype=case["dtype"], device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=case["dtype"], device=DEVICE)
    tables = random_tables(case["seq_lens"], bs, num_blocks, gen)
    seq_lens = torch.tensor(case["seq_lens"], dtype=case["lens_dtype"], device=DEVICE)
    return gen, k_cache, v_cache, tables, seq_lens


@given(paged_cases())
@example(dict(block_size=16, hkv=2, dim=64, seq_lens=[1, 1328 // 16, 18, 0, 463 // 8], spare=1,
              dtype=torch.float16, lens_dtype=torch.int32, seed=0))
def test_scatter_then_gather_returns_what_was_written(case):
    gen, k_cache, v_cache, tables, seq_lens = _paged_setup(case)
    slots = _torch_ops.slots_for(tables, seq_lens, case["block_size"])
    total = int(slots.shape[0])
    keys = torch.randn(total, case["hkv"], case["dim"], generator=gen).to(case["dtype"]).to(DEVICE)
    values = torch.randn(total, case["hkv"], case["dim"], generator=gen).to(case["dtype"]).to(DEVICE)
    cbkernels.scatter_kv(keys, values, k_cache, v_cache, slots)
    got_k, got_v, cu = cbkernels.gather_kv(k_cache, v_cache, tables, seq_lens)
    assert_bits_equal(got_k, keys)
    assert_bits_equal(got_v, values)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.cumsum(seq_lens.cpu(), 0).tolist()
    # Every slot outside the written ones is still NaN poison.
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=DEVICE)
    written[slots] = True
    assert torch.isnan(k_cache.flatten(0, 1)[~written]).all()
    assert torch.isnan(v_cache.flatten(0, 1)[~written]).all()


@given(paged_cases())
def test_gather_matches_reference_on_poisoned_cache(case):
    gen, k_cache, v_cache, tables, seq_lens = _paged_setup(case)
    # Fill owned slots through the reference, leave the rest NaN.
    slots = _torch_ops.slots_for(tables, seq_lens, case["block_size"])
    fill = torch.randn(slots.shape[0], case["hkv"], case["dim"], generator=gen).to(case["dtype"]).to(DEVICE)
    ref.scatter_kv(fill, -fill, k_cache, v_cache, slots)
    expected = ref.gather_kv(k_cache, v_cache, tables, seq_lens)
    got = cbkernels.gather_kv(k_cache, v_cache, tables, seq_lens)
    for g, e in zip(got, expected):
        assert_bits_equal(g, e)


@given(
    num_blocks=st.integers(2, 9), block_size=BLOCK_SIZES, hkv=NUM_KV_HEADS, dim=HEAD_DIMS,
    dtype=st.sampled_from(DTYPES), data=st.data(),
)
def test_copy_blocks_matches_reference(num_blocks, block_size, hkv, dim, dtype, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    k_cache = poisoned_cache(num_blocks, block_size, hkv, dim, dtype, gen)
    v_cache = poisoned_cache(num_blocks, block_size, hkv, dim, dtype, gen)
    ids = data.draw(st.permutations(range(num_blocks)))
    n_pairs = data.draw(st.integers(0, num_blocks // 2))
    mapping = torch.tensor([[ids[i], ids[n_pairs + i]] for i in range(n_pairs)], dtype=torch.int64).view(-1, 2)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    ref.copy_blocks(k_expected, v_expected, mapping)
    cbkernels.copy_blocks(k_cache, v_cache, mapping.to(DEVICE))
    assert_bits_equal(k_cache, k_expected)
    assert_bits_equal(v_cache, v_expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_fallback_matches_reference(dtype):
    """The CPU path the engine uses without the interpreter."""
    case = dict(block_size=5, hkv=3, dim=24, seq_lens=[7, 0, 12, 1], spare=2, dtype=dtype,
                lens_dtype=torch.int64, seed=3)
    gen, k_cache, v_cache, tables, seq_lens = _paged_setup(case)
    slots = _torch_ops.slots_for(tables, seq_lens, 5)
    key = torch.randn(slots.shape[0], 3, 24, generator=gen).to(dtype).to(DEVICE)
    slots[1] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.scatter_kv(key, key * 2, k_ref, v_ref, slots)
    _torch_ops.scatter_kv(key, key * 2, k_cache, v_cache, slots)
    assert_bits_equal(k_cache, k_ref)
    assert_bits_equal(v_cache, v_ref)
    for g, e in zip(_torch_ops.gather_kv(k_cache, v_cache, tables, seq_lens),
                    ref.gather_kv(k_cache, v_cache, tables, seq_lens)):
        assert_bits_equal(g, e)
    mapping = torch.tensor([[0, 3], [2, 1]], device=DEVICE)
    ref.copy_blocks(k_ref, v_ref, mapping)
    _torch_ops.copy_blocks(k_cache, v_cache, mapping)
    assert_bits_equal(k_cache, k_ref)
    assert_bits_equal(v_cache, v_ref)


def test_int64_offsets_past_2_to_the_31_elements():
    """A slot whose element offset overflows int32 lands where the reference puts it."""
    block_size, hkv, dim = 16, 1, 128
    # Two fp16 caches of just over 2**31 elements (4.3 GB each); torch.zeros pages lazily.
    num_blocks = (2**31) // (block_size * hkv * dim) + 1
    try:
        k_cache = torch.zeros(num_blocks, block_size, hkv, dim, dtype=torch.float16, device=DEVICE)
    except RuntimeError as exc:  # not enough memory on this machine
        pytest.skip(f"cannot allocate a cache over 2**31 elements: {exc}")
    v_cache = torch.zeros_like(k_cache)
    last_slot = num_blocks * block_size - 1
    slots = torch.tensor([last_slot, 5], dtype=torch.int64, device=DEVICE)
    key = torch.full((2, hkv, dim), 3.0, dtype=torch.float16, device=DEVICE)
    cbkernels.scatter_kv(key, -key, k_cache, v_cache, slots)
    assert k_cache.numel() > 2**31
    assert bool((k_cache[-1, -1] == 3).all()) and bool((v_cache[-1, -1] == -3).all())
    assert bool((k_cache[0, 5] == 3).all())
    tables = torch.tensor([[0, num_blocks - 1]], dtype=torch.int32, device=DEVICE)
    got_k, got_v, _ = cbkernels.gather_kv(k_cache, v_cache, tables, torch.tensor([32], device=DEVICE))
    assert bool((got_k[-1] == 3).all()) and bool((got_v[-1] == -3).all())


def test_cpu_tensors_run_the_triton_kernels_when_interpreting(monkeypatch):
    """Under TRITON_INTERPRET=1 the public functions must reach the Triton code, not torch."""
    if DEVICE != "cpu":
        pytest.skip("CPU dispatch only")
    from cbkernels.ops import use_triton

    def forbidden(*args, **kwargs):
        raise AssertionError("the torch fallback ran instead of the Triton kernel")

    for name in ("scatter_kv", "gather_kv", "copy_blocks"):
        monkeypatch.setattr(_torch_ops, name, forbidden)
    k_cache = torch.zeros(2, 4, 1, 16)
    v_cache = torch.zeros(2, 4, 1, 16)
    assert use_triton(k_cache)
    cbkernels.scatter_kv(torch.ones(1, 1, 16), torch.ones(1, 1, 16), k_cache, v_cache, torch.tensor([6]))
    keys, _, _ = cbkernels.gather_kv(k_cache, v_cache, torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([3]))
    cbkernels.copy_blocks(k_cache, v_cache, torch.tensor([[1, 0]]))
    assert keys[2].eq(1).all() and k_cache[0, 2].eq(1).all()

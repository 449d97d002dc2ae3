"""Hostile arguments, drawn by hypothesis, to every public entry point. Each must raise
the documented exception naming the argument before anything launches (kernels), or end
the one request FAILED with a reason (engine), and leave every block free."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import cbkernels
from cbkernels import BatchConfig, Engine, FIFOScheduler, PagedAttentionCache, PrefillFirstScheduler, RequestStatus as S
from cbkernels.engine.allocators import OutOfBlocks

VOCAB, MAX_POS = 64, 96
BLOCK, KV_HEADS, Q_HEADS, DIM, NUM_BLOCKS = 8, 2, 4, 16, 6
FUZZ = settings(max_examples=40)  # validation only: no kernel runs, so examples are cheap


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Validation must reject before any kernel launch: a launch fails the test."""
    import cbkernels.ops as ops

    def launched(*args, **kwargs):
        raise AssertionError("a kernel launched on bad arguments")

    for name in ("_scatter_kv_op", "_gather_kv_op", "_copy_blocks_op", "_paged_attention_op"):
        monkeypatch.setattr(ops, name, launched)


def _attention_args():
    k = torch.randn(NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    lens = [5, 11]
    return dict(q=torch.randn(2, Q_HEADS, DIM), k_cache=k, v_cache=torch.randn_like(k),
                block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32))


def _tensor_corruptions(name, t):
    """(bad value, argument named in the message) for one tensor argument."""
    other_float = torch.float64
    other_int = torch.int16
    wrong_dtype = t.to(other_float if t.dtype.is_floating_point else other_int)
    yield wrong_dtype, name
    yield t.unsqueeze(0), name  # one dimension too many
    yield t.tolist(), name  # not a tensor
    yield torch.empty(t.shape, dtype=t.dtype, device="meta"), name  # another device
    if t.dim() >= 2 and t.shape[0] > 1 and t.shape[1] > 1:
        yield t.transpose(0, 1), name  # wrong shape or non-contiguous


ATTENTION_SCALARS = [
    ("scale", v) for v in (0.0, -1.0, math.nan, math.inf, "1")] + [
    ("sliding_window", v) for v in (0, -3, 2.5)] + [
    ("softcap", v) for v in (0.0, -2.0, math.inf, math.nan)] + [
    ("max_seqlen_q", v) for v in (-1, 1.5, 0)] + [("max_seqlen_k", v) for v in (-1, 3)]
ATTENTION_VALUES = [  # (argument, bad tensor, name in message)
    ("seq_lens", torch.tensor([5, -1], dtype=torch.int32), "seq_lens"),
    ("seq_lens", torch.tensor([5, 10**6], dtype=torch.int32), "seq_lens"),
    ("seq_lens", torch.tensor([5], dtype=torch.int32), "seq_lens"),
    ("block_tables", torch.tensor([[0, 1], [2, NUM_BLOCKS + 5]], dtype=torch.int32), "block_tables"),
    ("block_tables", torch.tensor([[0, 1], [-7, 3]], dtype=torch.int32), "block_tables"),
    ("block_tables", torch.tensor([[0], [2]], dtype=torch.int32), "block_tables"),
    ("cu_seqlens_q", torch.tensor([0, 1, 3], dtype=torch.int32), "cu_seqlens_q"),
    ("cu_seqlens_q", torch.tensor([1, 1, 2], dtype=torch.int32), "cu_seqlens_q"),
    ("cu_seqlens_q", torch.tensor([0, 3, 2], dtype=torch.int32), "cu_seqlens_q"),
    ("q", torch.randn(2, 3, DIM), "q"),  # 3 heads: not a multiple of 2 KV heads
    ("q", torch.randn(2, Q_HEADS, 24), "head_dim"),
    ("sinks", torch.zeros(Q_HEADS + 1), "sinks"),
    ("out", torch.empty(3, Q_HEADS, DIM), "out"),
]


def _attention_cases():
    base = _attention_args()
    for name, t in base.items():
        for bad, named in _tensor_corruptions(name, t):
            yield name, bad, named
    for name, bad in ATTENTION_SCALARS:
        yield name, bad, name
    yield from ATTENTION_VALUES


ATTENTION_CASES = list(_attention_cases())


@FUZZ
@given(case=st.sampled_from(ATTENTION_CASES), nan=st.booleans())
def test_paged_attention_rejects_bad_arguments(case, nan):
    name, bad, named = case
    args = _attention_args()
    if nan:  # NaN in the data never matters to validation (it is contained, not scanned)
        args["q"][0, 0, 0] = math.nan
    args[name] = bad
    tensors = {k: args.pop(k) for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q")}
    with pytest.raises(ValueError) as info:
        cbkernels.paged_attention(*tensors.values(), **args)
    assert named in str(info.value)


def _scatter_args():
    k = torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    key = torch.randn(3, KV_HEADS, DIM)
    return dict(key=key, value=torch.randn_like(key), k_cache=k, v_cache=torch.zeros_like(k),
                slot_mapping=torch.tensor([0, 9, -1]))


SCATTER_VALUES = [
    ("slot_mapping", torch.tensor([0, 1, NUM_BLOCKS * BLOCK]), "slot_mapping"),
    ("slot_mapping", torch.tensor([0, 1]), "slot_mapping"),
    ("slot_mapping", torch.tensor([0.0, 1.0, 2.0]), "slot_mapping"),
    ("key", torch.randn(3, KV_HEADS + 1, DIM), "key"),
    ("value", torch.randn(4, KV_HEADS, DIM), "value"),
    ("key", torch.randn(3, KV_HEADS, DIM, dtype=torch.float16), "key"),
]


@FUZZ
@given(case=st.sampled_from([(n, b, m) for n, t in _scatter_args().items() for b, m in _tensor_corruptions(n, t)]
                            + SCATTER_VALUES))
def test_scatter_kv_rejects_bad_arguments_and_leaves_cache_untouched(case):
    name, bad, named = case
    args = _scatter_args()
    caches = (args["k_cache"], args["v_cache"])  # all zeros
    args[name] = bad
    with pytest.raises(ValueError) as info:
        cbkernels.scatter_kv(**args)
    assert named in str(info.value)
    assert not any(c.any() for c in caches)  # nothing written


GATHER_COPY_CASES = [
    ("gather", "block_tables", torch.tensor([[0, 99]], dtype=torch.int32), "block_tables"),
    ("gather", "block_tables", torch.tensor([[0, 1]], dtype=torch.int64), "block_tables"),
    ("gather", "seq_lens", torch.tensor([-4]), "seq_lens"),
    ("gather", "seq_lens", torch.tensor([10**9]), "seq_lens"),
    ("gather", "seq_lens", torch.tensor([1.0]), "seq_lens"),
    ("copy", "block_mapping", torch.tensor([[0, NUM_BLOCKS]]), "block_mapping"),
    ("copy", "block_mapping", torch.tensor([[-1, 2]]), "block_mapping"),
    ("copy", "block_mapping", torch.tensor([[0, 2], [1, 2]]), "block_mapping"),
    ("copy", "block_mapping", torch.tensor([[0, 2, 3]]), "block_mapping"),
    ("copy", "block_mapping", torch.tensor([[0.0, 2.0]]), "block_mapping"),
    ("copy", "k_cache", torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, DIM, dtype=torch.int32), "k_cache"),
    ("copy", "v_cache", torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, DIM + 8), "v_cache"),
]


@FUZZ
@given(case=st.sampled_from(GATHER_COPY_CASES))
def test_gather_kv_and_copy_blocks_reject_bad_arguments(case):
    op, name, bad, named = case
    k = torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    if op == "gather":
        args = dict(k_cache=k, v_cache=k.clone(), block_tables=torch.tensor([[0, 1]], dtype=torch.int32),
                    seq_lens=torch.tensor([9]))
        fn = cbkernels.gather_kv
    else:
        args = dict(k_cache=k, v_cache=k.clone(), block_mapping=torch.tensor([[0, 1]]))
        fn = cbkernels.copy_blocks
    args[name] = bad
    with pytest.raises(ValueError) as info:
        fn(**args)
    assert named in str(info.value)


# ------------------------------------------------------------------ BatchConfig
BATCH_CONFIG_VALUES = [("num_blocks", v) for v in (0, -5)] + [("block_size", v) for v in (0, 3, -8, 12)] + [
    ("max_batch_tokens", v) for v in (0, -1)] + [("max_num_seqs", v) for v in (0, -2)] + [
    ("scheduler", v) for v in ("lifo", "", "FIFO")] + [("backend", v) for v in ("cuda", "")] + [
    ("memory_fraction", v) for v in (0.0, -0.5, 1.5, math.nan)]
# Wrong types raise TypeError, wrong values of the right type ValueError (the layer's rule).
BATCH_CONFIG_TYPES = [("num_blocks", "4"), ("block_size", 8.0), ("max_batch_tokens", None), ("max_num_seqs", 2.5),
                      ("memory_fraction", "0.1"), ("seed", "7"), ("scheduler", None), ("backend", 3),
                      ("use_cuda_graph", "yes"), ("use_cuda_graph", 1), ("prefix_caching", "no")]


def _count_error(value) -> type:
    """What a bad count raises: TypeError unless it is an int (bools are not), else ValueError."""
    return TypeError if isinstance(value, bool) or not isinstance(value, int) else ValueError


@FUZZ
@given(case=st.sampled_from(BATCH_CONFIG_VALUES))
def test_batch_config_rejects_bad_values(case):
    name, bad = case
    with pytest.raises(ValueError) as info:
        BatchConfig(**{name: bad})
    assert name in str(info.value)


@pytest.mark.parametrize("name,bad", BATCH_CONFIG_TYPES)
def test_batch_config_rejects_bad_types(name, bad):
    with pytest.raises(TypeError) as info:
        BatchConfig(**{name: bad})
    assert name in str(info.value)


# ------------------------------------------------------------------ cache, allocators, schedulers
def _cache(**kw):
    return PagedAttentionCache(NUM_BLOCKS, BLOCK, 32, num_layers=1, num_kv_heads=1, head_dim=8, **kw)


BAD_COUNTS = st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True), st.none(), st.text(max_size=3),
                       st.booleans())


@FUZZ
@given(n=st.one_of(BAD_COUNTS, st.integers(min_value=NUM_BLOCKS + 1, max_value=2**62)),
       rid=st.one_of(st.just("r"), st.integers(), st.none()))
def test_allocate_blocks_rejects_bad_n_and_ids(n, rid):
    cache = _cache()
    cache.allocate_blocks(2, "keep")
    with pytest.raises((TypeError, ValueError, OutOfBlocks)) as info:
        cache.allocate_blocks(n, rid)
    message = str(info.value)
    n_is_count = isinstance(n, int) and not isinstance(n, bool) and n >= 0
    if not n_is_count:
        assert "n must be" in message  # the count is checked first
    elif not isinstance(rid, str):
        assert "request_id must be a str" in message
    else:
        assert info.type is OutOfBlocks and "needs" in message and "free" in message
    assert cache.get_num_free_blocks() == NUM_BLOCKS - 2  # nothing half-allocated
    cache.free_blocks("keep")
    cache.free_blocks("keep")  # freeing twice (or an unknown id) is a no-op
    cache.free_blocks("never-seen")
    assert cache.get_num_free_blocks() == NUM_BLOCKS


@FUZZ
@given(field=st.sampled_from(["num_blocks", "block_size", "max_batch_tokens", "num_kv_heads", "head_dim"]),
       bad=BAD_COUNTS)
def test_paged_cache_rejects_bad_sizes(field, bad):
    kw = dict(num_blocks=NUM_BLOCKS, block_size=BLOCK, max_batch_tokens=32, num_kv_heads=1, head_dim=8)
    kw[field] = bad
    with pytest.raises(_count_error(bad)) as info:
        PagedAttentionCache(kw.pop("num_blocks"), kw.pop("block_size"), kw.pop("max_batch_tokens"), **kw)
    assert field in str(info.value)


@FUZZ
@given(cls=st.sampled_from([FIFOScheduler, PrefillFirstScheduler]),
       field=st.sampled_from(["max_batch_tokens", "max_num_seqs"]), bad=st.one_of(BAD_COUNTS, st.just(0)))
def test_schedulers_reject_bad_arguments(cls, field, bad):
    kw = dict(max_batch_tokens=16, max_num_seqs=4)
    kw[field] = bad
    with pytest.raises(_count_error(bad)) as info:
        cls(_cache(), **kw)
    assert field in str(info.value)
    with pytest.raises(TypeError, match="cache"):
        cls(None, 16)


# ------------------------------------------------------------------ Engine
@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POS,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    return Engine(model, BatchConfig(backend="torch", num_blocks=10, block_size=8))  # 80 cache slots


GC = GenerationConfig(max_new_tokens=3, pad_token_id=0, eos_token_id=None, do_sample=False)
VALID = [[1, 2, 3], [5] * 9, list(range(1, 20))]


@pytest.fixture(scope="module")
def expected(engine):
    return [engine.generate([p], GC)[0].generated_tokens for p in VALID]


def _consistent(engine):
    return engine.cache.get_num_free_blocks() == engine.cache.num_blocks and not engine.scheduler.has_work()


BAD_INPUTS = [("hello", "inputs"), (5, "inputs"), (None, "inputs"), ({"a": 1}, "inputs"), (torch.ones(2, 3), "inputs"),
              ([[1, 2.5]], "inputs[0][1]"), ([[1], None], "inputs[1]"), ([["a"]], "inputs[0][0]"),
              ([[1], "abc"], "inputs[1]"), ([[True, 2]], "inputs[0][0]"), ([torch.tensor([1.0])], "inputs[0]")]


@FUZZ
@given(case=st.sampled_from(BAD_INPUTS))
def test_generate_rejects_malformed_inputs_before_scheduling(engine, expected, case):
    bad, named = case
    before = len(engine.requests)
    with pytest.raises(TypeError) as info:
        engine.generate(bad, GC)
    assert named in str(info.value)
    assert len(engine.requests) == before and _consistent(engine)


def _bad_gc(field, value):
    gc = GenerationConfig(max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    setattr(gc, field, value)  # past GenerationConfig's own checks, as a mutated config would be
    return gc


BAD_GCS = [({"max_new_tokens": 3}, "generation_config"), ("greedy", "generation_config"),
           (_bad_gc("temperature", -1.0), "temperature"), (_bad_gc("temperature", math.nan), "temperature"),
           (_bad_gc("top_p", 0.0), "top_p"), (_bad_gc("top_p", 1.5), "top_p"), (_bad_gc("top_k", -3), "top_k"),
           (_bad_gc("max_new_tokens", 2.5), "max_new_tokens"), (_bad_gc("max_new_tokens", "3"), "max_new_tokens")]


@FUZZ
@given(case=st.sampled_from(BAD_GCS))
def test_generate_rejects_bad_generation_config(engine, case):
    gc, named = case
    before = len(engine.requests)
    with pytest.raises((TypeError, ValueError)) as info:
        engine.generate(VALID[:1], gc)
    assert named in str(info.value)
    assert len(engine.requests) == before and _consistent(engine)


HOSTILE = {  # per-request problem -> (prompt, word in the FAILED reason)
    "empty": ([], "empty prompt"),
    "oov": ([1, VOCAB, 2], "outside the vocabulary"),
    "negative": ([3, -1], "outside the vocabulary"),
    "huge_id": ([2**40], "outside the vocabulary"),
    "too_long": ([1] * (MAX_POS + 1), "max_position_embeddings"),
    "past_cache": ([1] * 85, "KV cache"),
}


@FUZZ
@given(plan=st.lists(st.one_of(st.sampled_from(sorted(HOSTILE)), st.integers(0, len(VALID) - 1)), min_size=1, max_size=6))
def test_generate_fails_hostile_requests_and_serves_the_rest(engine, expected, plan):
    prompts = [HOSTILE[p][0] if isinstance(p, str) else VALID[p] for p in plan]
    outs = engine.generate(prompts, GC)
    assert [o.prompt_ids for o in outs] == prompts  # input order
    for p, o in zip(plan, outs):
        if isinstance(p, str):
            assert o.status is S.FAILED and HOSTILE[p][1] in o.error and o.generated_tokens == []
        else:
            assert o.status is S.FINISHED and o.error is None and o.generated_tokens == expected[p]
    assert _consistent(engine)


@pytest.mark.parametrize("max_new", [0, -4])
def test_non_positive_max_new_tokens_fail_each_request(engine, expected, max_new):
    outs = engine.generate(VALID, _bad_gc("max_new_tokens", max_new))
    assert all(o.status is S.FAILED and "max_new_tokens must be >= 1" in o.error for o in outs)
    assert _consistent(engine)
    assert [o.generated_tokens for o in engine.generate(VALID, GC)] == expected


def test_unknown_request_ids_raise_key_error(engine):
    for call in (engine.cancel, engine.get_result, lambda rid: list(engine.stream(rid))):
        with pytest.raises(KeyError, match="unknown request_id 'nope'"):
            call("nope")
    with pytest.raises(TypeError, match="request_id"):
        engine.add_request([1, 2], GC, request_id=7)
    rid = engine.add_request([1, 2], GC, request_id="dup")
    with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
        engine.add_request([1, 2], GC, request_id="dup")
    assert len(list(engine.stream(rid))) == 3 and _consistent(engine)


def test_engine_rejects_a_config_of_the_wrong_type(engine):
    with pytest.raises(TypeError, match="config must be a cbkernels.BatchConfig"):
        Engine(engine.model, {"num_blocks": 4})

"""Block pool, allocators and prefix cache: unit tests plus a hypothesis state machine."""
import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cbkernels.engine.allocators import BlockPool, OutOfBlocks, SlidingAttentionCacheAllocator
from cbkernels.engine.cache import PagedAttentionCache
from cbkernels.engine.config import BatchConfig
from cbkernels.engine.requests import Request, SamplingParams
from cbkernels.testing import assert_pool_accounting

BLOCK = 4


def _req(rid, tokens):
    return Request(rid, len(tokens), list(tokens), SamplingParams())


def _cache(num_blocks=16, windows=None, prefix=True, layers=2):
    return PagedAttentionCache(num_blocks, BLOCK, 64, num_layers=layers, num_kv_heads=1, head_dim=8,
                               layer_windows=windows, prefix_caching=prefix)


def test_pool_take_release_and_lru_eviction():
    pool = BlockPool(3)
    a, b, c = pool.take(), pool.take(), pool.take()
    with pytest.raises(OutOfBlocks):
        pool.take()
    pool.register(a, 111, None, (1, 2))
    pool.register(b, 222, None, (3, 4))
    pool.release(b)
    pool.release(a)  # both cached and unreferenced; b is the least recently freed
    assert pool.num_free() == 2
    assert pool.take() == b and pool.lookup(222, None, (3, 4)) is None and pool.lookup(111, None, (1, 2)) == a
    pool.share(a)  # a hit revives the cached block
    assert pool.num_free() == 0
    with pytest.raises(RuntimeError):
        pool.release(c) or pool.release(c)


def test_prefix_hit_then_copy_on_write():
    cache = _cache()
    tokens = list(range(8))  # exactly two full blocks
    first = _req("a", tokens)
    cache.reserve(first, len(tokens))
    first.num_computed = len(tokens)
    cache.commit(first)
    cache.kv[:, :, cache.allocators[0].block_table("a")[1]] = 7.0
    second = _req("b", tokens)
    copies = cache.match_prefix(second)
    # The last token must be recomputed, so its (shared) block is copied, not written.
    assert second.num_computed == 7 and len(copies) == 1
    src, dst = copies[0]
    assert src == cache.allocators[0].block_table("a")[1] and dst == cache.allocators[0].block_table("b")[1]
    cache.apply_copies(copies)
    assert torch.equal(cache.kv[:, :, dst], cache.kv[:, :, src])
    assert cache.allocators[0].block_table("b")[0] == cache.allocators[0].block_table("a")[0]
    assert cache.prefix_hit_rate() == pytest.approx(7 / 8)
    cache.release(first)
    cache.release(second)
    assert cache.get_num_free_blocks() == cache.num_blocks


def test_prefix_hit_needs_equal_tokens_not_only_an_equal_hash():
    """Force every block hash to collide: a lookup must still refuse blocks whose tokens (or
    prefix) differ, so one prompt can never read another prompt's K/V."""
    cache = _cache()
    cache.pool.hash_fn = lambda parent, tokens: 7  # every block collides
    first = _req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    cache.reserve(first, len(first.tokens))
    first.num_computed = len(first.tokens)
    cache.commit(first)
    assert cache.pool.lookup(7, None, (1, 2, 3, 4)) is not None  # the real content is found
    other = _req("b", [4, 3, 2, 1, 5, 6, 7, 8, 9])  # same hash, other tokens
    assert cache.match_prefix(other) == [] and other.num_computed == 0
    assert cache.allocators[0].block_table("b") == []
    same = _req("c", [1, 2, 3, 4, 0, 0, 0, 0, 1])  # first block equal, second differs: one block hit
    cache.match_prefix(same)
    assert same.num_computed == BLOCK
    assert cache.allocators[0].block_table("c") == cache.allocators[0].block_table("a")[:1]
    for req in (first, other, same):
        cache.release(req)
    assert_pool_accounting(cache)


def test_block_hashes_are_the_same_in_every_process():
    """Python's hash() is salted per process; block hashes must not be (multi-process serving)."""
    import subprocess
    import sys

    code = "from cbkernels.engine.allocators import chain_hash; print(chain_hash(chain_hash(None, [1, 2]), [3, 4]))"
    env_values = set()
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        env_values.add(out.stdout.strip())
    from cbkernels.engine.allocators import chain_hash

    assert env_values == {str(chain_hash(chain_hash(None, [1, 2]), [3, 4]))}
    assert chain_hash(None, [1, 2]) != chain_hash(None, [2, 1]) != chain_hash(chain_hash(None, [0]), [1, 2])


def test_sliding_ring_stays_bounded():
    pool = BlockPool(32)
    alloc = SlidingAttentionCacheAllocator(pool, BLOCK, sliding_window=6)
    assert alloc.ring_size == 3
    computed = 0
    for _ in range(40):  # decode one token at a time
        need = -(-(computed + 1) // BLOCK) - len(alloc.block_table("r"))
        if need > 0:
            alloc.allocate_blocks(need, "r", computed)
        computed += 1
        alloc.trim("r", computed)
        assert len(alloc.held["r"]) <= alloc.ring_size
        # every position inside the window of the next query maps to a block it still holds
        held = {alloc.tables["r"][lg] for lg in alloc.held["r"]}
        for pos in range(max(0, computed - 6), computed):
            assert alloc.tables["r"][pos // BLOCK] in held
    alloc.free_blocks("r")
    assert pool.num_free() == 32


def test_mixed_layer_groups():
    cache = _cache(windows=[None, 8, None, 8], layers=4)
    assert cache.group_of_layer == [0, 1, 0, 1] and not cache.prefix_caching


def test_num_blocks_from_memory_budget():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    cache = PagedAttentionCache.for_model(model, BatchConfig(max_cache_bytes=1 << 20, max_num_seqs=1000))
    per_block = 2 * 2 * 16 * 1 * 16 * 4
    assert 1 <= cache.num_blocks <= (1 << 20) // per_block
    cache = PagedAttentionCache.for_model(model, BatchConfig(max_num_seqs=2))
    assert cache.num_blocks == 2 * 64 // 16  # capped by what the requests could ever use


class CacheMachine(RuleBasedStateMachine):
    """Random admissions (with shared prefixes), growth, preemption-like frees."""

    def __init__(self):
        super().__init__()
        self.cache = _cache(num_blocks=12)
        self.live: dict[str, Request] = {}
        self.n = 0

    @rule(prefix=st.sampled_from([(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8)]),
          tail=st.lists(st.integers(0, 5), min_size=1, max_size=9))
    def admit(self, prefix, tail):
        req = _req(f"r{self.n}", list(prefix) + tail)
        self.n += 1
        copies = self.cache.match_prefix(req)
        try:
            self.cache.reserve(req, req.remaining)
        except OutOfBlocks:
            self.cache.release(req)
            return
        self.cache.apply_copies(copies)
        req.num_computed = len(req.tokens)
        self.cache.commit(req)
        self.live[req.request_id] = req

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data):
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        req.tokens.append(data.draw(st.integers(0, 5)))
        try:
            self.cache.reserve(req, 1)
        except OutOfBlocks:
            return
        req.num_computed += 1
        self.cache.commit(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.cache.release(self.live.pop(rid))

    @invariant()
    def accounting(self):
        assert_pool_accounting(self.cache)
        for rid, req in self.live.items():
            assert len(self.cache.allocators[0].block_table(rid)) * BLOCK >= req.num_computed

    def teardown(self):
        for req in self.live.values():
            self.cache.release(req)
        assert self.cache.get_num_free_blocks() == self.cache.num_blocks


TestCacheMachine = CacheMachine.TestCase

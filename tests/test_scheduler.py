"""Schedulers without a model: a driver plays the engine's bookkeeping (fake tokens) so
hypothesis can explore budgets, preemption and prefix hits quickly."""
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cbkernels.engine.cache import PagedAttentionCache
from cbkernels.engine.requests import Request, RequestStatus as S, SamplingParams
from cbkernels.engine.scheduler import FIFOScheduler, PrefillFirstScheduler
from cbkernels.testing import assert_pool_accounting

BLOCK = 4
FAKE_TOKEN = 3


class Driver:
    def __init__(self, cls, num_blocks, max_batch_tokens, prefix=True, **options):
        self.cache = PagedAttentionCache(num_blocks, BLOCK, max_batch_tokens, num_layers=1, num_kv_heads=1,
                                         head_dim=8, prefix_caching=prefix)
        self.sched = cls(self.cache, max_batch_tokens, max_num_seqs=4, **options)
        self.next_pos: dict[str, int] = {}  # where the next chunk of each admitted request must start
        self.done: list[Request] = []
        self.n = 0

    def add(self, prompt, max_new, priority=0):
        req = Request(f"r{self.n}", len(prompt), list(prompt), SamplingParams(max_new_tokens=max_new), priority=priority)
        self.n += 1
        self.sched.add(req)
        return req

    def step(self):
        batch = self.sched.schedule()
        assert batch.total_tokens <= self.sched.max_batch_tokens
        for req in batch.preempted:
            self.next_pos.pop(req.request_id, None)
            assert req.status is S.PENDING and req.num_computed == 0
        self.done.extend(batch.failed)
        self.cache.apply_copies(batch.copies)
        sampled = []
        for req, n in zip(batch.requests, batch.num_tokens):
            start = self.next_pos.setdefault(req.request_id, req.num_computed)  # prefix hit on admission
            assert req.num_computed == start and n >= 1  # chunks tile each prompt exactly once
            self.next_pos[req.request_id] = start + n
            sampled.append(FAKE_TOKEN if start + n == len(req.tokens) else None)
        finished = self.sched.postprocess(batch, sampled, 0.0)
        self.sched.observe_step(batch, 1e-5 * (10 + batch.total_tokens))  # a step costs its tokens
        for req in finished:
            assert req.status is S.FINISHED and req.stop_reason() is not None
            self.next_pos.pop(req.request_id)
        for req, token in zip(batch.requests, sampled):
            expected = S.SPLIT_PENDING_REMAINDER if token is None else (S.FINISHED if req in finished else S.DECODING)
            assert req.status is expected
        self.done.extend(finished)
        return batch

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            if not self.step().requests and not self.sched.running and self.sched.waiting:
                raise AssertionError("stuck with an empty cache")
        raise AssertionError("did not finish")


@pytest.mark.parametrize("cls", [FIFOScheduler, PrefillFirstScheduler])
def test_split_prefill_and_completion(cls):
    d = Driver(cls, num_blocks=64, max_batch_tokens=5)
    reqs = [d.add(range(n), 3) for n in (1, 7, 12, 4)]
    d.run()
    assert all(r.status is S.FINISHED and len(r.generated) == 3 for r in reqs)
    assert d.cache.get_num_free_blocks() == d.cache.num_blocks


def test_preempts_newest_and_recovers():
    d = Driver(FIFOScheduler, num_blocks=6, max_batch_tokens=64, prefix=False)
    reqs = [d.add(range(7), 9) for _ in range(3)]
    d.run()
    assert all(r.status is S.FINISHED for r in reqs)
    assert reqs[-1].num_preemptions >= 1 and reqs[0].num_preemptions == 0


def test_request_that_never_fits_fails_at_once():
    d = Driver(FIFOScheduler, num_blocks=4, max_batch_tokens=64)
    big, small = d.add(range(30), 4), d.add(range(3), 2)
    d.step()
    assert big.status is S.FAILED and "KV cache" in big.error
    d.run()
    assert small.status is S.FINISHED


def test_prefill_first_orders_prefills_before_decodes():
    d = Driver(PrefillFirstScheduler, num_blocks=64, max_batch_tokens=8)
    first = d.add(range(3), 5)
    d.step()
    assert first.status is S.DECODING
    second = d.add(range(20), 2)
    batch = d.step()
    assert batch.requests[0] is second and batch.num_tokens[0] == 8 and first not in batch.requests


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.d = None

    @initialize(cls=st.sampled_from([FIFOScheduler, PrefillFirstScheduler]), blocks=st.integers(3, 16),
                budget=st.integers(1, 12), prefix=st.booleans(), admission=st.sampled_from(["greedy", "predictive"]),
                itl=st.sampled_from([None, 0.05]))
    def configure(self, cls, blocks, budget, prefix, admission, itl):
        self.d = Driver(cls, blocks, budget, prefix, admission=admission, target_itl_ms=itl, aging_steps=3)

    @rule(shared=st.booleans(), n=st.integers(1, 14), max_new=st.integers(1, 6), priority=st.integers(-1, 2))
    def add(self, shared, n, max_new, priority):
        self.d.add(([1, 2, 3, 4, 5] if shared else []) + [9] * n, max_new, priority)


    @rule()
    def step(self):
        if self.d.sched.has_work():
            self.d.step()

    @invariant()
    def accounting(self):
        if self.d is None:  # invariants also run before the initialize rule
            return
        assert_pool_accounting(self.d.cache)
        for req in self.d.sched.running:
            assert len(self.d.cache.allocators[0].block_table(req.request_id)) * BLOCK >= req.num_computed
        for req in self.d.sched.waiting:
            assert req.num_computed == 0 and not self.d.cache.allocators[0].block_table(req.request_id)
            assert req.admission_slot == -1
        p = self.d.sched.predictive
        if p is not None:  # exactly the running requests hold admission slots
            assert {p.owner[s] for s in range(len(p.alive)) if p.alive[s]} == set(self.d.sched.running)
            assert 0.0 <= p.margin <= 0.5
        assert 1 <= self.d.sched.last_budget <= self.d.sched.max_batch_tokens

    def teardown(self):
        if self.d is not None:
            self.d.run()
            assert self.d.cache.get_num_free_blocks() == self.d.cache.num_blocks
            assert all(r.is_done for r in self.d.done)


TestSchedulerMachine = SchedulerMachine.TestCase

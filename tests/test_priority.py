"""Priorities: the waiting queue as a state machine (higher first, FIFO within a priority,
aging bounds every wait), preemption's victim (lowest priority, newest), the engine's
``priority`` argument."""
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine
from cbkernels.engine.cache import PagedAttentionCache
from cbkernels.engine.requests import Request, SamplingParams
from cbkernels.engine.scheduler import FIFOScheduler, ScheduledBatch
from cbkernels.engine.waiting import WaitQueue
from cbkernels.testing import reference_tokens, tiny_llama, token_prompts

AGING = 4
MAX_PRIO = 3


def _req(i, prio, step=0):
    r = Request(f"r{i}", 1, [1], SamplingParams(max_new_tokens=1), priority=prio)
    r.queued_step = step
    return r


class QueueMachine(RuleBasedStateMachine):
    """Arrivals of random priorities, at most MAX_ARRIVALS a step, one pop a step."""

    MAX_ARRIVALS = 2

    def __init__(self):
        super().__init__()
        self.q = WaitQueue(aging_steps=AGING)
        self.step, self.n, self.arrived_this_step = 0, 0, 0
        self.waiting = []  # (request, queue length when it arrived)
        self.popped = []

    @precondition(lambda self: self.arrived_this_step < self.MAX_ARRIVALS)
    @rule(prio=st.integers(0, MAX_PRIO))
    def arrive(self, prio):
        r = _req(self.n, prio, self.step)
        self.n += 1
        self.arrived_this_step += 1
        self.waiting.append((r, len(self.q)))
        self.q.append(r)

    @rule()
    def tick(self):
        self.step += 1
        self.arrived_this_step = 0
        if self.q:
            head = self.q.head()
            r = self.q.popleft()
            assert r is head
            # the head has the largest aging key (ties: the higher priority); appends only here,
            # so within a priority the head is also the one with the largest key
            def key(w):  # effective priority priority + waited / AGING, scaled by AGING
                return (w.priority * AGING - w.queued_step, w.priority)

            assert all(key(r) >= key(w) for w, _ in self.waiting)
            # FIFO within a priority: nobody of its priority that arrived earlier is still waiting
            assert not any(w.priority == r.priority and int(w.request_id[1:]) < int(r.request_id[1:])
                           for w, _ in self.waiting if w is not r)
            ahead = next(k for w, k in self.waiting if w is r)
            waited = self.step - r.queued_step
            # aging: later arrivals overtake it for at most (MAX_PRIO - prio) * AGING steps
            assert waited <= ahead + 1 + self.MAX_ARRIVALS * ((MAX_PRIO - r.priority) * AGING + 1)
            self.waiting = [(w, k) for w, k in self.waiting if w is not r]
            self.popped.append(r)

    @invariant()
    def sizes_agree(self):
        assert len(self.q) == len(self.waiting)
        assert all(w in self.q for w, _ in self.waiting)


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = __import__("hypothesis").settings(max_examples=60, stateful_step_count=80, deadline=None)


def test_front_insertion_and_remove():
    q = WaitQueue(aging_steps=AGING)
    a, b, c = _req(0, 0), _req(1, 0), _req(2, 1)
    q.append(a)
    q.append(b)
    q.appendleft(c)  # a different priority: goes to the front of its own deque
    assert q.head() is c
    q.extendleft([_req(3, 0)])
    q.remove(c)
    assert [q.popleft().request_id for _ in range(3)] == ["r3", "r0", "r1"]
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(ValueError, match="aging_steps"):
        WaitQueue(aging_steps=0)


def test_victim_is_lowest_priority_then_newest():
    cache = PagedAttentionCache(8, 4, 16, num_layers=1, num_kv_heads=1, head_dim=8)
    sched = FIFOScheduler(cache, 16)
    reqs = [_req(i, p) for i, p in enumerate([0, 2, 0, 1, 2])]
    for r in reqs:
        sched._priorities.add(r.priority)
        sched.running[r] = None
    batch = ScheduledBatch()
    assert sched._victim(batch) is reqs[2]  # priority 0, the newer of the two
    batch.members.add(reqs[2])
    assert sched._victim(batch) is reqs[0]
    batch.members.update({reqs[0], reqs[3]})
    assert sched._victim(batch) is reqs[4]  # only priority 2 left: the newest


def test_engine_priority_order_and_identity():
    model = tiny_llama(vocab=96, max_positions=128)
    prompts = token_prompts([6, 9, 4, 7, 5], vocab=96)
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = Engine(model, BatchConfig(backend="torch", num_blocks=16, block_size=8, max_num_seqs=1))
    prios = [0, 1, 5, 1, -2]
    ids = [engine.add_request(p, gc, priority=k) for p, k in zip(prompts, prios)]
    while engine.scheduler.has_work():
        engine.step()
    order = sorted(ids, key=lambda i: engine.requests[i].first_scheduled_step)
    assert order == [ids[2], ids[1], ids[3], ids[0], ids[4]]  # higher first, FIFO among the 1s
    assert [engine.get_result(i).generated_tokens for i in ids] == reference_tokens(model, prompts, gc)
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    for bad, exc in (("1", TypeError), (1.0, TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(exc, match="priority"):
            engine.add_request(prompts[0], gc, priority=bad)

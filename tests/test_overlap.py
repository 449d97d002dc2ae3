"""Asynchronous scheduling (``BatchConfig(async_scheduling=True)``): the host schedules and
builds step N+1 while step N runs, with step N's sampled tokens fed to step N+1 on the device
and read back one step later. On a CPU nothing overlaps, so what is proven here is that it is
correct: the tokens of ``model.generate()`` under split prefill, preemption, prefix sharing,
stops at EOS and cancellation, and every block free afterwards."""
import statistics
import time

import pytest
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine, RequestStatus
from cbkernels.testing import assert_pool_accounting, reference_tokens, tiny_llama, tiny_sliding_qwen2, token_prompts

VOCAB = 96
LENGTHS = (3, 9, 17, 30, 1, 41, 12, 5)
LLAMA = dict(vocab=VOCAB)


def _gen(max_new=8, **kw):
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, **{"eos_token_id": None, **kw})


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(**LLAMA)


@pytest.fixture(scope="module")
def prompts():
    return token_prompts(LENGTHS, vocab=VOCAB)


def _engine(model, **kw):
    return Engine(model, BatchConfig(backend="torch", async_scheduling=True, **kw))


@pytest.mark.parametrize("kw", [
    dict(), dict(max_batch_tokens=7, block_size=8), dict(num_blocks=10, block_size=8),
    dict(scheduler="prefill_first", max_batch_tokens=12, block_size=8), dict(max_num_seqs=3),
])
def test_matches_generate(llama, prompts, kw):
    gc = _gen()
    engine = _engine(llama, **kw)
    outs = engine.generate(prompts, gc)
    assert [o.generated_tokens for o in outs] == reference_tokens(llama, prompts, gc)
    assert all(o.status is RequestStatus.FINISHED for o in outs)
    assert engine.metrics()["async_steps"] > 0
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    assert_pool_accounting(engine.cache)


def test_small_cache_preempts_and_still_matches(llama, prompts):
    gc = _gen(12)
    engine = _engine(llama, num_blocks=16, block_size=4, max_batch_tokens=16)
    outs = engine.generate(prompts[:6], gc)
    assert [o.generated_tokens for o in outs] == reference_tokens(llama, prompts[:6], gc)
    assert engine.metrics()["preemptions"] > 0
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_eos_stops_exactly_where_generate_stops(llama, prompts):
    """EOS is only known once a token is read back: the request stops there, and the row the
    next step already computed for it is dropped."""
    free_run = reference_tokens(llama, prompts, _gen(10))
    eos = free_run[2][3]  # a token some request produces mid-way
    gc = _gen(10, eos_token_id=eos)
    engine = _engine(llama)
    outs = engine.generate(prompts, gc)
    assert [o.generated_tokens for o in outs] == reference_tokens(llama, prompts, gc)
    assert outs[2].generated_tokens[-1] == eos and len(outs[2].generated_tokens) == 4
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_sliding_windows_match(prompts):
    model = tiny_sliding_qwen2(vocab=VOCAB)
    gc = _gen(10)
    outs = _engine(model, block_size=4, max_batch_tokens=9).generate(prompts, gc)
    assert [o.generated_tokens for o in outs] == reference_tokens(model, prompts, gc)


def test_cancel_mid_decode_frees_blocks_and_spares_the_rest(llama, prompts):
    gc = _gen(12)
    engine = _engine(llama, block_size=4)
    ids = [engine.add_request(p, gc) for p in prompts[:4]]
    while len(engine.get_result(ids[1]).generated_tokens) < 3:
        engine.step()
    engine.cancel(ids[1])
    while engine.scheduler.has_work():
        engine.step()
    outs = [engine.pop_result(i) for i in ids]
    expected = reference_tokens(llama, prompts[:4], gc)
    assert outs[1].status is RequestStatus.FINISHED and outs[1].finish_reason == "cancelled"
    assert outs[1].generated_tokens == expected[1][:len(outs[1].generated_tokens)]
    assert [o.generated_tokens for i, o in enumerate(outs) if i != 1] == [e for i, e in enumerate(expected) if i != 1]
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_default_is_off_on_cpu_and_on_for_cuda_configs(llama):
    assert Engine(llama, BatchConfig(backend="torch")).config.async_scheduling is False
    with pytest.raises(TypeError, match="async_scheduling"):
        BatchConfig(async_scheduling="yes")


def test_forked_siblings_match_the_synchronous_engine(llama, prompts):
    """num_return_sequences forks siblings off a prompt computed once; with tokens read back a
    step late the siblings get the same tokens as with synchronous steps (no stop: no extra
    rows, so even seeded sampling draws the same numbers in the same order)."""
    for sampling in (dict(top_k=1), dict(temperature=0.8)):
        gc = _gen(8, do_sample=True, num_return_sequences=3, **sampling)
        runs = []
        for overlap in (False, True):
            engine = Engine(llama, BatchConfig(backend="torch", async_scheduling=overlap, seed=3, block_size=4))
            runs.append([o.generated_tokens for o in engine.generate(prompts[:4], gc)])
            assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
        assert len(runs[1]) == 12 and runs[1] == runs[0]


class _SlowEvent:
    """Stands in for a CUDA event whose step is still running on the device."""

    def synchronize(self):
        time.sleep(0.02)


def test_waiting_for_the_device_is_not_counted_as_host_work(llama, prompts, monkeypatch):
    """The read-back of an in-flight step waits for the device (here a fake event that takes
    20 ms): that wait counts as device time in ``last_step_timing["device_wait"]`` and stays
    out of ``host_ms_per_step_p50``, while the step's wall time includes it."""
    from cbkernels.engine import overlap

    init = overlap.InFlightStep.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.tokens is not None:
            self._event = _SlowEvent()

    monkeypatch.setattr(overlap.InFlightStep, "__init__", slow_init)
    engine = Engine(llama, BatchConfig(async_scheduling=True, num_blocks=64))
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    for p in prompts[:3]:
        engine.add_request(p, gc)
    waits, walls = [], []
    while engine.scheduler.has_work() or engine._in_flight is not None:
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
        waits.append(engine.last_step_timing["device_wait"])
    read_backs = [w for w in waits if w > 0]
    assert len(read_backs) >= 6 and all(w >= 0.02 for w in read_backs)
    assert statistics.median(walls) >= 0.02
    assert engine.metrics()["host_ms_per_step_p50"] < 15.0
    assert_pool_accounting(engine.cache)

"""Several threads add, stream, cancel and generate while a background loop steps the
engine: every request's tokens equal those of a single-threaded run, none lost or mixed."""
import threading

import pytest
import torch
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine
from cbkernels.testing import tiny_llama

VOCAB = 96
THREADS, PER_THREAD = 4, 5
JOIN_TIMEOUT_S = 60  # a hang fails the test instead of blocking the suite
VICTIM_MAX_NEW = 60  # prompt (< 30) + 60 fits the 96-slot cache below: it runs until cancelled


def _gen(max_new):
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, eos_token_id=None, do_sample=False)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab=VOCAB, hidden=32, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def work(llama):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(THREADS * PER_THREAD)]
    max_new = [int(torch.randint(1, 9, (1,), generator=g)) for _ in prompts]
    single = Engine(llama, BatchConfig(backend="torch"))
    expected = [single.generate([p], _gen(m))[0].generated_tokens for p, m in zip(prompts, max_new)]
    return prompts, max_new, expected


def _run_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"


@pytest.mark.parametrize("scheduler", ["fifo", "prefill_first"])
def test_threads_add_stream_cancel_generate(llama, work, scheduler):
    prompts, max_new, expected = work
    # A small cache and budget force preemption and split prefill under contention.
    engine = Engine(llama, BatchConfig(backend="torch", block_size=8, num_blocks=12, max_batch_tokens=16,
                                       scheduler=scheduler))
    streamed, errors, cancelled = {}, [], []

    def client(k):
        try:
            for i in range(k * PER_THREAD, (k + 1) * PER_THREAD):
                rid = engine.add_request(prompts[i], _gen(max_new[i]), request_id=f"t{i}")
                streamed[i] = list(engine.stream(rid))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def canceller():
        try:
            for j in range(3):
                rid = engine.add_request(prompts[j], _gen(VICTIM_MAX_NEW), request_id=f"victim{j}")
                for _ in engine.stream(rid):
                    break  # one token in, then cancel mid-decode
                engine.cancel(rid)
                cancelled.append(engine.get_result(rid))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    batch_out = []

    def batcher():
        try:
            batch_out.extend(engine.generate(prompts[:4], _gen(max_new[0])))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with engine:  # background serving loop
        _run_threads([lambda k=k: client(k) for k in range(THREADS)] + [canceller, batcher])
    assert not errors, errors
    assert engine.loop_error is None
    assert [streamed[i] for i in range(len(prompts))] == expected
    for i in range(len(prompts)):
        assert engine.get_result(f"t{i}").generated_tokens == expected[i]
    assert [o.generated_tokens[:max_new[0]] for o in batch_out] == [
        Engine(llama, BatchConfig(backend="torch")).generate([p], _gen(max_new[0]))[0].generated_tokens
        for p in prompts[:4]]
    assert all(r.finish_reason == "cancelled" and 1 <= len(r.generated_tokens) < VICTIM_MAX_NEW for r in cancelled), [(r.finish_reason, len(r.generated_tokens), r.error) for r in cancelled]
    assert len(cancelled) == 3
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks and not engine.scheduler.has_work()
    assert llama.config._attn_implementation == "sdpa"


def test_stream_waits_without_spinning_and_stop_is_clean(llama, work):
    prompts, max_new, expected = work
    engine = Engine(llama, BatchConfig(backend="torch")).start()
    rid = engine.add_request(prompts[0], _gen(max_new[0]))
    assert list(engine.stream(rid)) == expected[0]
    engine.stop(timeout=JOIN_TIMEOUT_S)
    assert not engine._loop.is_alive()
    # Without the loop the caller drives again.
    rid = engine.add_request(prompts[1], _gen(max_new[1]))
    assert list(engine.stream(rid)) == expected[1]
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks

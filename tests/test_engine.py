"""Engine on tiny random-weight models: token identity with model.generate(), sliding
windows, sampling, streaming, cancellation, failures, metrics."""
import sys

import pytest
import torch
from transformers import GenerationConfig

import cbkernels
from cbkernels import BatchConfig, Engine, RequestStatus
from cbkernels.testing import tiny_llama, tiny_sliding_qwen2, token_prompts

VOCAB = 96
LENGTHS = (3, 9, 17, 30, 1, 41)  # awkward lengths around block boundaries of 8


def _gen(max_new=6, **kw):
    kw.setdefault("eos_token_id", None)
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab=VOCAB)


@pytest.fixture(scope="module")
def prompts():
    return token_prompts(LENGTHS, vocab=VOCAB)


def _reference(model, prompts, gc):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("kw", [
    dict(), dict(max_batch_tokens=7, block_size=8), dict(num_blocks=8, block_size=8),
    dict(scheduler="prefill_first", max_batch_tokens=12, block_size=8), dict(prefix_caching=False),
])
def test_matches_generate(llama, prompts, kw):
    gc = _gen()
    engine = Engine(llama, BatchConfig(backend="torch", **kw))
    outs = engine.generate(prompts, gc)
    assert [o.generated_tokens for o in outs] == _reference(llama, prompts, gc)
    assert all(o.status is RequestStatus.FINISHED and o.error is None for o in outs)
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    assert llama.config._attn_implementation == "sdpa"  # restored


def test_prefix_cache_hits_and_identity(llama, prompts):
    system = prompts[-1]  # 41 shared tokens
    shared = [system + p for p in prompts[:4]]
    gc = _gen()
    engine = Engine(llama, BatchConfig(backend="torch", block_size=8, max_num_seqs=1))
    whole = system[:40]  # five full blocks, all cached by then: the last one is copied on write
    outs = engine.generate(shared + [whole], gc)
    assert [o.generated_tokens for o in outs] == _reference(llama, shared + [whole], gc)
    assert engine.metrics()["prefix_hit_rate"] > 0.5
    assert outs[1].prefix_hit_tokens == 40 and outs[-1].prefix_hit_tokens == 39
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_sliding_window_layers_match_generate(prompts):
    model = tiny_sliding_qwen2(vocab=VOCAB, window=10)
    gc = _gen(max_new=12)
    engine = Engine(model, BatchConfig(backend="torch", block_size=8, max_batch_tokens=16))
    assert [a.sliding_window for a in engine.cache.allocators] == [None, 10]
    outs = engine.generate(prompts, gc)
    assert [o.generated_tokens for o in outs] == _reference(model, prompts, gc)
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_seeded_sampling_is_reproducible(llama, prompts):
    gc = _gen(max_new=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    runs = [Engine(llama, BatchConfig(backend="torch", seed=7)).generate(prompts, gc) for _ in range(2)]
    assert [o.generated_tokens for o in runs[0]] == [o.generated_tokens for o in runs[1]]
    assert all(len(o.generated_tokens) == 8 for o in runs[0])


def test_streaming_cancel_and_results(llama, prompts):
    engine = Engine(llama, BatchConfig(backend="torch"))
    a = engine.add_request(prompts[1], _gen(max_new=5))
    b = engine.add_request(prompts[2], _gen(max_new=50))
    streamed = list(engine.stream(a))
    assert streamed == engine.get_result(a).generated_tokens and len(streamed) == 5
    engine.cancel(b)
    res = engine.get_result(b)
    assert res.status is RequestStatus.FINISHED and res.finish_reason == "cancelled"
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    assert res.ttft_s is not None and engine.get_result(a).e2e_s > 0


def test_eos_stops(llama, prompts):
    ref = _reference(llama, prompts[:1], _gen(max_new=6))[0]
    out = Engine(llama, BatchConfig(backend="torch")).generate(prompts[:1], _gen(max_new=6, eos_token_id=ref[2]))
    assert out[0].generated_tokens == ref[:3] and out[0].finish_reason == "eos"


def test_never_fitting_request_fails_with_reason(llama, prompts):
    engine = Engine(llama, BatchConfig(backend="torch", num_blocks=4, block_size=8))
    outs = engine.generate([prompts[5], prompts[0], []], _gen())
    assert outs[0].status is RequestStatus.FAILED and "KV cache" in outs[0].error
    assert outs[1].error is None and len(outs[1].generated_tokens) == 6
    assert outs[2].error == "empty prompt"
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_metrics_snapshot_and_exporter(llama, prompts):
    engine = Engine(llama, BatchConfig(backend="torch"))
    engine.generate(prompts, _gen())
    m = engine.metrics()
    for key in ("active_requests", "waiting_requests", "ttft_mean_s", "itl_mean_s", "e2e_mean_s",
                "generated_tokens_per_s", "cache_occupancy", "prefix_hit_rate", "padding_saved"):
        assert key in m
    assert m["generated_tokens"] == 6 * len(prompts) and 0 < m["padding_saved"] < 1


def test_prometheus_exporter(llama, prompts):
    pytest.importorskip("prometheus_client")
    engine = Engine(llama, BatchConfig(backend="torch"))
    exporter = cbkernels.PrometheusExporter(engine)
    engine.generate(prompts, _gen())
    text = exporter.exposition().decode()
    assert f"cbkernels_generated_tokens {6.0 * len(prompts)}" in text
    assert "cbkernels_cache_free_blocks" in text and "cbkernels_prefix_hit_rate" in text


def test_prometheus_exporter_without_the_package_says_which_extra(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="metrics"):
        cbkernels.PrometheusExporter(Engine(llama, BatchConfig(backend="torch")))


def test_generate_batch_one_shot(llama, prompts):
    gc = _gen()
    outs = cbkernels.generate_batch(llama, prompts[:3], gc, BatchConfig(backend="torch"))
    assert [o.generated_tokens for o in outs] == _reference(llama, prompts[:3], gc)


def test_finished_requests_are_not_retained(llama, prompts):
    """generate() hands its outputs over and forgets them; pop_result does the same for
    add_request users, and refuses a request that is still running."""
    engine = Engine(llama, BatchConfig(backend="torch"))
    engine.generate(prompts[:2], _gen())
    assert engine.requests == {}
    rid = engine.add_request(prompts[0], _gen())
    with pytest.raises(ValueError, match="still running"):
        engine.pop_result(rid)
    tokens = list(engine.stream(rid))
    assert engine.pop_result(rid).generated_tokens == tokens
    with pytest.raises(KeyError, match="unknown request_id"):
        engine.get_result(rid)

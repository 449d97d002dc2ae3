"""transformers' own continuous-batching tests as a peer suite, run on cbkernels.

The cases of transformers' ``tests/generation/test_continuous_batching.py`` (and its
neighbour ``tests/generation/test_paged_attention.py``), ported to run against cbkernels
through the opt-in binding ``cbkernels.enable(model)``: the test calls transformers' API
(``model.generate_batch``, ``model.continuous_batching_context_manager``, the manager's
methods) exactly as a transformers user would. transformers' test files are not shipped in
its wheel, so each case is reconstructed from the behaviour it checks, as transformers 5.24
implements it (``transformers/generation/continuous_batching/``); every case names its
origin. transformers' cases load Hub checkpoints; here they run on tiny random models of the
same architectures and, where text matters, on the embedded SmolLM2. Cases that do not apply
to cbkernels are listed in ``NOT_APPLICABLE`` with the reason.
"""
import queue

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

import cbkernels
from cbkernels.testing import tiny_llama, tiny_model, tiny_sliding_qwen2, token_prompts

VOCAB = 96
ORIGIN = "transformers tests/generation/test_continuous_batching.py"

NOT_APPLICABLE = {
    "test_attention_mask / build_attention_mask": "transformers builds a block-causal mask for paged|eager; "
    "cbkernels' kernels take sequence lengths and build no mask",
    "test_cuda_graph* / varlen and decode graph padding": "needs CUDA; cbkernels' decode graphs are tested in "
    "tests/test_cuda_graphs.py, and transformers' padding intervals have no counterpart (warned)",
    "test_compile* / default_compile_level": "cbkernels does not torch.compile the model (warned)",
    "test_fast_decode_path / max_blocks_per_request": "a flash-attn-with-kvcache path of transformers; cbkernels' "
    "kernels read block tables of any length",
    "test_async_batching": "cbkernels' steps are synchronous (use_async_batching warns)",
    "test_cpu_offloading*": "cbkernels recomputes preempted requests instead of offloading (cpu_offload_space warns)",
    "test_tensor_parallel* / NCCL graph mixing": "cbkernels runs on one device",
    "test_eos_token_id_none_sets_minus_one": "transformers' manager disables EOS when the generation config has "
    "none; cbkernels takes the model's EOS as model.generate() does (tests/test_hf_config.py)",
    "test_workload_hints_sizing": "hints size transformers' cache; cbkernels sizes its own and warns that they are "
    "not used",
    "test_cache_internals (allocators, block pool, sector accounting)": "transformers' internal classes; the "
    "equivalent checks of cbkernels' cache are tests/test_cache.py and tests/test_kv_cache.py",
}


@pytest.fixture
def llama():
    model = cbkernels.enable(tiny_llama(vocab=VOCAB))
    yield model
    cbkernels.disable(model)


@pytest.fixture(scope="module")
def prompts():
    return token_prompts((3, 9, 17, 30), vocab=VOCAB)


def _gc(max_new=6, **kw):
    kw.setdefault("do_sample", False)
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, **kw)


def _generate(model, prompts, gc):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist() for p in prompts]


def test_not_applicable_cases_are_listed_with_reasons():
    assert NOT_APPLICABLE and all(len(reason) > 20 for reason in NOT_APPLICABLE.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("allow_block_sharing", [True, False])
def test_continuous_batching_parity(arch, allow_block_sharing, prompts):
    """origin: ORIGIN, test_continuous_batching_parity (generate_batch equals generate() per
    prompt; transformers runs it on Llama / Qwen / Gemma / GPT-OSS checkpoints)."""
    model = cbkernels.enable(tiny_model(arch))
    gc = _gc(max_new=8)
    cb = ContinuousBatchingConfig(page_size=16, allow_block_sharing=allow_block_sharing)
    results = model.generate_batch(prompts, gc, continuous_batching_config=cb)
    assert list(results) == [f"req_{i}" for i in range(len(prompts))]
    assert [r.generated_tokens for r in results.values()] == _generate(model, prompts, gc)
    assert all(isinstance(r, GenerationOutput) and r.status == RequestStatus.FINISHED for r in results.values())
    cbkernels.disable(model)


def test_paged_attention_matches_generate_on_a_real_checkpoint():
    """origin: transformers tests/generation/test_paged_attention.py (a paged attention
    implementation under generate_batch gives generate()'s text on a real model)."""
    from cbkernels.models import cached_default_model

    model, tok = cached_default_model()
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
             for q in ("What is 2 + 2?", "Name a colour.")]
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    cbkernels.enable(model)
    try:
        results = model.generate_batch(chats, gc)
    finally:
        cbkernels.disable(model)
    assert [r.generated_tokens for r in results.values()] == _generate(model, chats, gc)


def test_streaming_request(llama, prompts):
    """origin: ORIGIN, test_streaming_request (each streamed chunk holds one more token; the
    last one is finished)."""
    with llama.continuous_batching_context_manager(_gc(max_new=3)) as manager:
        rid = manager.add_request(prompts[1], max_new_tokens=3, streaming=True)
        chunks = list(manager.request_id_iter(rid))
    assert [len(c.generated_tokens) for c in chunks] == [1, 2, 3]
    assert [c.is_finished() for c in chunks] == [False, False, True]
    assert chunks[-1].generated_tokens == _generate(llama, prompts[1:2], _gc(max_new=3))[0]


def test_non_streaming_request(llama, prompts):
    """origin: ORIGIN, test_non_streaming_request (one result, finished, all tokens)."""
    with llama.continuous_batching_context_manager(_gc(max_new=3)) as manager:
        rid = manager.add_request(prompts[1], max_new_tokens=3)
        chunks = list(manager.request_id_iter(rid))
    assert len(chunks) == 1 and chunks[0].is_finished() and len(chunks[0].generated_tokens) == 3


def test_streaming_and_non_streaming_requests_can_alternate(llama, prompts):
    """origin: ORIGIN, test_streaming_and_non_streaming_requests_can_alternate."""
    with llama.continuous_batching_context_manager(_gc(max_new=3)) as manager:
        for streaming, expected in ((True, [1, 2, 3]), (False, [3]), (True, [1, 2, 3])):
            rid = manager.add_request(prompts[2], max_new_tokens=3, streaming=streaming)
            assert [len(c.generated_tokens) for c in manager.request_id_iter(rid)] == expected


def test_prefix_sharing(llama, prompts):
    """origin: ORIGIN, test_prefix_sharing (a second request with the same prefix reuses the
    first one's cache blocks and generates the same tokens)."""
    system = prompts[3]
    cb = ContinuousBatchingConfig(page_size=8, allow_block_sharing=True, max_requests_per_batch=1)
    results = llama.generate_batch([system + [5, 6], system + [7]], _gc(), continuous_batching_config=cb)
    outs = list(results.values())
    assert outs[0].prefix_hit_tokens == 0 and outs[1].prefix_hit_tokens == 24  # three full blocks of 8
    assert [o.generated_tokens for o in outs] == _generate(llama, [system + [5, 6], system + [7]], _gc())


def test_block_sharing_with_hybrid_model(prompts):
    """origin: ORIGIN, test_block_sharing_with_hybrid_model (sliding-window layers turn block
    sharing off; outputs still match generate())."""
    model = cbkernels.enable(tiny_sliding_qwen2(vocab=VOCAB, window=10))
    manager = model.init_continuous_batching(_gc(), ContinuousBatchingConfig(page_size=8, allow_block_sharing=True))
    assert manager.engine.cache.prefix_caching is False
    assert [a.sliding_window for a in manager.engine.cache.allocators] == [None, 10]  # one group per layer type
    results = model.generate_batch(prompts, _gc(), continuous_batching_config=ContinuousBatchingConfig(page_size=8))
    assert [r.generated_tokens for r in results.values()] == _generate(model, prompts, _gc())
    cbkernels.disable(model)


def test_num_return_sequences(llama, prompts):
    """origin: ORIGIN, test_num_return_sequences (n results per prompt, ids req_i__child#k
    listed before req_i; siblings are distinct samples)."""
    gc = _gc(max_new=6, do_sample=True, num_return_sequences=3)
    results = llama.generate_batch(prompts[:2], gc, continuous_batching_config=ContinuousBatchingConfig(seed=1))
    assert list(results) == ["req_0__child#0", "req_0__child#1", "req_0", "req_1__child#0", "req_1__child#1", "req_1"]
    assert all(len(r.generated_tokens) == 6 and r.error is None for r in results.values())
    assert len({tuple(r.generated_tokens) for r in results.values()}) > 2


def test_return_logprobs(llama, prompts):
    """origin: ORIGIN, test_return_logprobs (one log-probability per generated token, the log
    of the processed distribution's value at the token)."""
    gc = _gc(max_new=4)
    results = llama.generate_batch(prompts[:2], gc, continuous_batching_config=ContinuousBatchingConfig(return_logprobs=True))
    for p, r in zip(prompts, results.values()):
        with torch.no_grad():
            ref = llama.generate(torch.tensor([p]), generation_config=gc, output_scores=True, return_dict_in_generate=True)
        expected = [s[0].log_softmax(-1)[t].item() for s, t in zip(ref.scores, r.generated_tokens)]
        assert len(r.logprobs) == 4 and max(abs(a - b) for a, b in zip(r.logprobs, expected)) < 1e-4


def test_generate_with_paged_cache_implementation(llama, prompts):
    """origin: ORIGIN, generate(cache_implementation="paged") switching to generate_batch."""
    with torch.no_grad():
        out = llama.generate(torch.tensor([prompts[1]]), max_new_tokens=5, do_sample=False, cache_implementation="paged")
    assert out[0, 0, len(prompts[1]):].tolist() == _generate(llama, prompts[1:2], _gc(max_new=5))[0]


def test_generate_batch_empty_inputs(llama):
    """origin: ORIGIN (generate_batch returns {} for no inputs)."""
    assert llama.generate_batch([], _gc()) == {}


def test_record_timestamps(llama, prompts):
    """origin: ORIGIN, record_timestamps (a timestamp per generated token only when asked)."""
    with_stamps = llama.generate_batch(prompts[:1], _gc(max_new=4), record_timestamps=True)["req_0"]
    without = llama.generate_batch(prompts[:1], _gc(max_new=4))["req_0"]
    assert len(with_stamps.timestamps) == 4 and with_stamps.timestamps == sorted(with_stamps.timestamps)
    assert without.timestamps is None and without.lifespan[1] >= without.lifespan[0] > 0


def test_persistent_manager(llama, prompts):
    """origin: ORIGIN, persistent_manager (the manager is kept on the model and reused until
    destroy_cached_continuous_batching_manager)."""
    first = llama.generate_batch(prompts[:1], _gc(), persistent_manager=True)
    manager = llama.init_continuous_batching()
    assert llama.init_continuous_batching() is manager and not manager.is_running()
    second = llama.generate_batch(prompts[:1], _gc(), persistent_manager=True)
    assert first["req_0"].generated_tokens == second["req_1"].generated_tokens  # same manager: ids go on
    llama.destroy_cached_continuous_batching_manager()
    assert llama.init_continuous_batching() is not manager


def test_cancel_request(llama, prompts):
    """origin: ORIGIN, cancel_request (a cancelled request frees its blocks; others finish)."""
    with llama.continuous_batching_context_manager(_gc(max_new=200)) as manager:
        with manager.pause():
            slow = manager.add_request(prompts[1], max_new_tokens=200)
            fast = manager.add_request(prompts[0], max_new_tokens=2)
            manager.cancel_request(slow)
        results = {r.request_id: r for r in (manager.get_result(timeout=30), manager.get_result(timeout=30))}
        engine = manager.engine
    assert len(results[slow].generated_tokens) < 200 and len(results[fast].generated_tokens) == 2
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_get_result_timeout_returns_none(llama, prompts):
    """origin: ORIGIN, get_result(timeout=...) returns None when nothing finished in time."""
    with llama.continuous_batching_context_manager(_gc()) as manager:
        assert manager.get_result(timeout=0.05) is None
        with manager.pause():
            manager.add_request(prompts[0])
            assert manager.get_result(timeout=0.05) is None  # paused: nothing can finish
        assert manager.get_result(timeout=30).is_finished()
    assert manager.get_result(timeout=0.05) is None and not manager.is_running()


def test_pause_requires_a_running_loop_and_blocks_stop(llama):
    """origin: ORIGIN, pause (only while running; stop() inside a pause is refused)."""
    manager = llama.init_continuous_batching(_gc())
    with pytest.raises(RuntimeError, match="not running"):
        with manager.pause():
            pass
    manager.start()
    with manager.pause():
        with pytest.raises(RuntimeError, match="pause"):
            manager.stop()
    manager.stop()
    assert not manager.is_running()


def test_stopped_manager_drops_new_requests(llama, prompts):
    """origin: ORIGIN (add_request after stop warns and returns None)."""
    with llama.continuous_batching_context_manager(_gc()) as manager:
        pass
    with pytest.warns(RuntimeWarning, match="stopping"):
        assert manager.add_request(prompts[0]) is None


def test_hard_stop_fails_pending_requests(llama, prompts):
    """origin: ORIGIN, stop(hard_stop=True) (unfinished requests fail with an error)."""
    manager = llama.init_continuous_batching(_gc(max_new=200))
    rid = manager.add_request(prompts[1], max_new_tokens=200)
    manager.start()
    manager.stop(hard_stop=True)
    result = manager.get_result(rid, timeout=5)
    assert result.status == RequestStatus.FAILED and "stopped" in result.error


def test_max_queue_size(llama, prompts):
    """origin: ORIGIN, max_queue_size (requests beyond the queue's size are refused)."""
    manager = llama.init_continuous_batching(_gc(), ContinuousBatchingConfig(max_queue_size=2))
    manager.add_request(prompts[0])
    manager.add_request(prompts[1])
    with pytest.raises(queue.Full):
        manager.add_request(prompts[2])  # no loop runs to drain the queue
    manager.start()
    manager.stop()
    assert sum(1 for _ in range(2) if manager.get_result(timeout=5) is not None) == 2


def test_per_request_processors(llama, prompts):
    """origin: ORIGIN, per_request_processors (logit processor kwargs per request only when
    enabled; unknown ones are an error)."""
    off = llama.init_continuous_batching(_gc(do_sample=True))
    with pytest.raises(ValueError, match="per_request_processors"):
        off.add_request(prompts[0], temperature=0.5)
    on = llama.init_continuous_batching(_gc(do_sample=True), ContinuousBatchingConfig(per_request_processors=True))
    with pytest.raises(ValueError, match="not_a_field"):
        on.add_request(prompts[0], not_a_field=1)
    greedy_like = on.add_request(prompts[1], top_k=1)
    on.start()
    on.stop()
    assert on.get_result(greedy_like, timeout=5).generated_tokens == _generate(llama, prompts[1:2], _gc())[0]


def test_request_failure_is_reported(llama):
    """origin: ORIGIN (a request that cannot run comes back with an error, status FAILED)."""
    results = llama.generate_batch([[1] * 300, [1, 2]], _gc())
    assert results["req_0"].status == RequestStatus.FAILED and "max_position_embeddings" in results["req_0"].error
    assert results["req_1"].error is None and len(results["req_1"].generated_tokens) == 6


def test_schedulers_give_the_same_tokens(llama, prompts):
    """origin: ORIGIN, scheduler_type (FIFO and prefill-first schedule differently, same tokens)."""
    outs = [llama.generate_batch(prompts, _gc(), continuous_batching_config=ContinuousBatchingConfig(
        scheduler_type=s, page_size=8, max_batch_tokens=16)) for s in ("fifo", "prefill_first")]
    assert [r.generated_tokens for r in outs[0].values()] == [r.generated_tokens for r in outs[1].values()]


def test_continuous_batching_config_in_generation_config_is_deprecated(llama, prompts):
    """origin: ORIGIN (a ContinuousBatchingConfig passed through the GenerationConfig still
    applies, with a deprecation warning)."""
    gc = _gc()
    gc.continuous_batching_config = ContinuousBatchingConfig(page_size=8, num_blocks=40)
    with pytest.warns(FutureWarning, match="deprecated"):
        manager = llama.init_continuous_batching(gc)
    assert manager.engine.cache.block_size == 8 and manager.engine.cache.num_blocks == 40


def test_disable_restores_transformers(llama):
    """The binding is per model and undone by disable (no global patching)."""
    from transformers.generation.continuous_batching.continuous_api import ContinuousMixin

    other = tiny_llama(vocab=VOCAB)
    assert other.generate_batch.__func__ is ContinuousMixin.generate_batch
    cbkernels.disable(llama)
    assert llama.generate_batch.__func__ is ContinuousMixin.generate_batch
    assert llama.init_continuous_batching.__func__ is ContinuousMixin.init_continuous_batching

"""Faults and recovery: a forward that raises mid-run, cancellation during prefill and
decode, KeyboardInterrupt inside generate, NaN containment in the kernels, safe loading."""
import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import cbkernels
import cbkernels.reference
from cbkernels import BatchConfig, Engine, RequestStatus as S
from cbkernels.models import load_model
from cbkernels.testing import tiny_llama, token_prompts

VOCAB = 96
LENGTHS = (3, 9, 17, 30, 5, 12)


def _gen(max_new=6):
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, eos_token_id=None, do_sample=False)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab=VOCAB)


@pytest.fixture(scope="module")
def prompts():
    return token_prompts(LENGTHS, vocab=VOCAB)


@pytest.fixture(scope="module")
def expected(llama, prompts):
    """Tokens of every prompt run alone on a fresh engine: the ground truth."""
    return [Engine(llama, BatchConfig(backend="torch")).generate([p], _gen())[0].generated_tokens for p in prompts]


class FailOnCall:
    """Wraps a module's forward so that its ``nth`` call (1-based) raises."""

    def __init__(self, module, nth, exc=RuntimeError("injected fault")):
        self.module, self.nth, self.exc, self.calls = module, nth, exc, 0
        self.original = module.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth:
                raise self.exc
            return self.original(*args, **kwargs)
        self.module.forward = forward
        return self

    def __exit__(self, *exc):
        self.module.forward = self.original


def _all_free(engine):
    return engine.cache.get_num_free_blocks() == engine.cache.num_blocks and not engine.scheduler.has_work()


@pytest.mark.parametrize("nth", [1, 3, 7])
def test_forward_fault_fails_only_that_step(llama, prompts, expected, nth):
    # max_num_seqs=2 keeps later requests waiting while the fault hits the running ones.
    engine = Engine(llama, BatchConfig(backend="torch", block_size=8, max_num_seqs=2, max_batch_tokens=16))
    with FailOnCall(llama.model.layers[1].self_attn, nth):
        outs = engine.generate(prompts, _gen())
    failed = [o for o in outs if o.status is S.FAILED]
    assert 1 <= len(failed) <= 2  # exactly the requests of the faulting step
    assert all("injected fault" in o.error and "RuntimeError" in o.error for o in failed)
    for o, want in zip(outs, expected):
        if o.status is not S.FAILED:
            assert o.status is S.FINISHED and o.generated_tokens == want
    assert _all_free(engine)
    # The engine keeps serving, with correct tokens.
    again = engine.generate(prompts[:2], _gen())
    assert [o.generated_tokens for o in again] == expected[:2]
    assert _all_free(engine) and llama.config._attn_implementation == "sdpa"


def test_sampling_fault_is_contained(llama, prompts, expected, monkeypatch):
    import cbkernels.engine.model_runner as mr

    real, calls = mr.sample, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("bad sampling")
        return real(*args, **kwargs)

    monkeypatch.setattr(mr, "sample", flaky)
    engine = Engine(llama, BatchConfig(backend="torch"))
    outs = engine.generate(prompts, _gen())
    assert sum(o.status is S.FAILED for o in outs) >= 1
    assert all(o.generated_tokens == w for o, w in zip(outs, expected) if o.error is None)
    assert _all_free(engine)


def _steps_until(engine, rid, status):
    for _ in range(50):
        if engine.requests[rid].status is status:
            return
        engine.step()
    raise AssertionError(f"{rid} never reached {status}")


@pytest.mark.parametrize("phase", [S.SPLIT_PENDING_REMAINDER, S.DECODING])
def test_cancel_during_prefill_and_decode_frees_everything(llama, prompts, expected, phase):
    engine = Engine(llama, BatchConfig(backend="torch", block_size=8, max_batch_tokens=8))
    victim = engine.add_request(prompts[3], _gen(max_new=40))  # 30 tokens: split over 4 steps
    other = engine.add_request(prompts[0], _gen())
    _steps_until(engine, victim, phase)
    engine.cancel(victim)
    assert engine.get_result(victim).finish_reason == "cancelled"
    assert list(engine.stream(other)) == expected[0]
    assert _all_free(engine)


def test_keyboard_interrupt_in_generate_leaves_engine_reusable(llama, prompts, expected):
    engine = Engine(llama, BatchConfig(backend="torch", block_size=8))
    with FailOnCall(llama.model.layers[0].mlp, 4, KeyboardInterrupt()):
        with pytest.raises(KeyboardInterrupt):
            engine.generate(prompts, _gen())
    assert _all_free(engine) and llama.config._attn_implementation == "sdpa"
    assert all(r.status is S.FAILED and "KeyboardInterrupt" in r.error for r in engine.requests.values())
    assert [o.generated_tokens for o in engine.generate(prompts, _gen())] == expected


def test_exception_in_step_caller_keeps_engine_consistent(llama, prompts, expected):
    engine = Engine(llama, BatchConfig(backend="torch"))
    rid = engine.add_request(prompts[1], _gen())
    with FailOnCall(llama.model, 1):
        assert engine.step() == []
    res = engine.get_result(rid)
    assert res.status is S.FAILED and "injected fault" in res.error
    assert _all_free(engine)
    assert engine.generate([prompts[1]], _gen())[0].generated_tokens == expected[1]


# ------------------------------------------------------------------ NaN containment
def test_nan_in_one_sequence_stays_in_its_rows():
    """A NaN/inf key, value or query of sequence 0 never reaches sequence 1's output or
    cache slots (the kernels do not scan values: containment is the guarantee)."""
    torch.manual_seed(0)
    block, heads, dim = 8, 2, 16
    k_cache = torch.zeros(4, block, heads, dim)
    v_cache = torch.zeros_like(k_cache)
    lens = [5, 7]
    key = torch.randn(sum(lens), heads, dim)
    value = torch.randn_like(key)
    key[1, 0, 3], value[2, 1, 0] = float("nan"), float("inf")
    slots = torch.tensor([0 * block + i for i in range(5)] + [2 * block + i for i in range(7)])
    cbkernels.scatter_kv(key, value, k_cache, v_cache, slots)
    assert torch.isfinite(k_cache[2]).all() and torch.isfinite(v_cache[2]).all()  # sequence 1's block
    q = torch.randn(sum(lens), heads, dim)
    q[0, 0, 0] = float("nan")
    tables = torch.tensor([[0, 3], [2, 1]], dtype=torch.int32)
    out = cbkernels.paged_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32),
                                    torch.tensor([0, 5, 12], dtype=torch.int32))
    assert torch.isfinite(out[5:]).all()
    ref = cbkernels.reference.paged_attention(q[5:], k_cache, v_cache, tables[1:], torch.tensor(lens[1:]),
                                              torch.tensor([0, 7], dtype=torch.int32))
    torch.testing.assert_close(out[5:], ref.to(out.dtype), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ safe loading
def _tiny_checkpoint(tmp_path, safe):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    if not safe:  # transformers 5 always writes safetensors: turn it into a pickled checkpoint
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    vocab = {f"t{i}": i for i in range(31)} | {"[UNK]": 31}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    path = _tiny_checkpoint(tmp_path, safe=False)
    assert (path / "pytorch_model.bin").exists() and not list(path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="allow_pickle=True") as info:
        load_model(path)
    assert "pytorch_model.bin" in str(info.value)
    model, _ = load_model(path, allow_pickle=True)
    assert model.config.vocab_size == 32


def test_safetensors_checkpoint_loads_offline(tmp_path, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(_tiny_checkpoint(tmp_path, safe=True))
    assert seen["local_files_only"] is True and seen["use_safetensors"] is True
    assert model.config.num_hidden_layers == 1


def test_cli_never_evaluates_prompt_text(tmp_path):
    from cbkernels.prompts import collect_prompts

    marker = tmp_path / "pwned"
    payloads = [f"__import__('pathlib').Path({str(marker)!r}).touch()", "{{ 7*7 }}", "$(touch x)", "`id`"]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join('{"prompt": %s}' % __import__("json").dumps(p) for p in payloads))
    got = collect_prompts([], str(path), None)
    assert [g if isinstance(g, str) else g for g in got] == payloads
    assert not marker.exists()

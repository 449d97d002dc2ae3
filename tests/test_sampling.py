"""Logits processing, sampling, log-probabilities and num_return_sequences against
model.generate(): greedy tokens identical field by field (stopping point included), sampled
tokens checked by chi-square against transformers' own warpers, one device-to-host copy per
step, siblings that share their prompt's cache blocks."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import GenerationConfig
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from cbkernels import BatchConfig, Engine, RequestStatus
from cbkernels.engine import sampling
from cbkernels.engine.requests import Request, SamplingParams
from cbkernels.testing import assert_pool_accounting, tiny_llama, tiny_sliding_qwen2, token_prompts

VOCAB = 96
LENGTHS = (1, 5, 12, 30)  # a one-token prompt exercises forced BOS and begin-suppress's shifted start


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab=VOCAB)


@pytest.fixture(scope="module")
def prompts():
    return token_prompts(LENGTHS, vocab=VOCAB, seed=3)


def _generate(model, prompt, gc, **kw):
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=gc, **kw)


def _reference(model, prompts, gc):
    return [_generate(model, p, gc)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def plain(llama, prompts):
    """Greedy continuations without any processor: the cases below pick their tokens from them."""
    return _reference(llama, prompts, GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0))


def _cases(plain):
    first, second = plain[2][:2]  # tokens the 12-token prompt's greedy run emits first
    eos = plain[2][1]  # greedy stops after 2 tokens on that prompt unless min length bans EOS
    return {
        "repetition_penalty": dict(repetition_penalty=1.7),
        "repetition_penalty_below_1": dict(repetition_penalty=0.6),
        "min_new_tokens": dict(min_new_tokens=7, eos_token_id=eos),
        "min_length": dict(min_length=16, eos_token_id=eos),
        "no_repeat_ngram_1": dict(no_repeat_ngram_size=1),
        "no_repeat_ngram_2": dict(no_repeat_ngram_size=2),
        "no_repeat_ngram_3": dict(no_repeat_ngram_size=3),
        "bad_words_ids": dict(bad_words_ids=[[first], [second, plain[2][2]], [eos, 4, 9]], eos_token_id=eos),
        "suppress_tokens": dict(suppress_tokens=[first, plain[3][0], 17]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[first, plain[0][0], plain[3][0]]),
        "forced_eos_token_id": dict(forced_eos_token_id=[5, 6], max_new_tokens=5),
        "forced_bos_token_id": dict(forced_bos_token_id=11, begin_suppress_tokens=[plain[0][1]]),
        "eos_stops": dict(eos_token_id=[eos, plain[3][3]]),
        "everything": dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3, eos_token_id=eos,
                           bad_words_ids=[[second]], suppress_tokens=[17], forced_eos_token_id=eos,
                           begin_suppress_tokens=[first]),
    }


CASE_NAMES = ["repetition_penalty", "repetition_penalty_below_1", "min_new_tokens", "min_length",
              "no_repeat_ngram_1", "no_repeat_ngram_2", "no_repeat_ngram_3", "bad_words_ids", "suppress_tokens",
              "begin_suppress_tokens", "forced_eos_token_id", "forced_bos_token_id", "eos_stops", "everything"]


def _gc(**kw):
    kw.setdefault("max_new_tokens", 12)
    return GenerationConfig(do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_greedy_tokens_match_generate_field_by_field(llama, prompts, plain, case):
    gc = _gc(**_cases(plain)[case])
    expected = _reference(llama, prompts, gc)
    assert expected != plain or case == "forced_bos_token_id"  # the field changes generate()'s tokens
    engine = Engine(llama, BatchConfig(backend="torch", block_size=4, max_batch_tokens=16))
    outs = engine.generate(prompts, gc)
    assert [o.generated_tokens for o in outs] == expected
    assert all(o.status is RequestStatus.FINISHED for o in outs)
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_forced_bos_hits_only_a_one_token_prompt(llama, prompts, plain):
    gc = _gc(forced_bos_token_id=11)
    outs = Engine(llama, BatchConfig(backend="torch")).generate(prompts, gc)
    assert outs[0].generated_tokens[0] == 11 and outs[0].generated_tokens == _reference(llama, prompts[:1], gc)[0]
    assert [o.generated_tokens for o in outs[1:]] == [p[:12] for p in plain[1:]]


def test_one_batch_mixes_every_setting_row_by_row(llama, prompts, plain):
    """Every request of one step carries its own settings: each matches its own generate()."""
    cases = _cases(plain)
    engine = Engine(llama, BatchConfig(backend="torch", block_size=8))
    plan = [(p, name) for p in prompts for name in CASE_NAMES]
    ids = [engine.add_request(p, _gc(**cases[name])) for p, name in plan]
    while engine.scheduler.has_work():
        engine.step()
    for rid, (p, name) in zip(ids, plan):
        assert engine.pop_result(rid).generated_tokens == _reference(llama, [p], _gc(**cases[name]))[0], name


# ------------------------------------------------------------------ sampling statistics
def _request(params, tokens=(1, 2, 3)):
    return Request("r", len(tokens), list(tokens), params)


def _reference_probs(logits, params):
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    scores = warpers(torch.zeros(1, 1, dtype=torch.long), logits.unsqueeze(0).clone())
    return scores.softmax(-1)[0].double()


def _chi_square_p(counts, probs, n):
    from scipy.stats import chisquare

    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the reference support was sampled"
    expected = probs[support] * n
    big = expected >= 5  # pool the rare tokens into one bin so the test is valid
    obs = torch.cat([counts[support][big].double(), counts[support][~big].sum().double().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if len(obs) < 2:  # one possible token: the support check above is the whole test
        return 1.0
    return chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue  # sums agree exactly


PARAMS = st.builds(
    lambda t, k, p, m: SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p, min_p=m),
    st.floats(0.4, 2.0), st.integers(0, 7), st.floats(0.3, 1.0), st.sampled_from([0.0, 0.05, 0.3]))


@settings(max_examples=10)
@given(logits=st.lists(st.integers(-30, 30), min_size=5, max_size=10, unique=True).map(lambda xs: [x / 10 for x in xs]),
       a=PARAMS, b=PARAMS, seed=st.integers(0, 2**16))
def test_sampled_tokens_follow_the_warped_distribution_per_row(logits, a, b, seed):
    """Rows alternate between two drawn settings in one call: each half's tokens fit its own
    reference distribution (transformers' warpers) by a chi-square test. Logits are distinct:
    with ties, which tied tokens top-p keeps depends on the sort's tie order."""
    pytest.importorskip("scipy")
    n = 1500
    x = torch.tensor(logits, dtype=torch.float32)
    reqs = [_request(a if i % 2 == 0 else b) for i in range(2 * n)]
    tokens = torch.tensor(sampling.sample(x.repeat(2 * n, 1), reqs, torch.Generator().manual_seed(seed)))
    for half, params in ((tokens[0::2], a), (tokens[1::2], b)):
        probs = _reference_probs(x, params)
        counts = torch.bincount(half, minlength=len(logits))
        assert _chi_square_p(counts, probs, n) > 1e-4


def test_first_sampled_token_of_forked_siblings_follows_the_model(llama):
    """At a fixed step (the first token) 400 siblings of one prompt sample from the model's
    warped distribution."""
    pytest.importorskip("scipy")
    prompt = token_prompts((9,), vocab=VOCAB, seed=5)[0]
    gc = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=1.4, top_k=6, num_return_sequences=400,
                          pad_token_id=0)
    outs = Engine(llama, BatchConfig(backend="torch", seed=11)).generate([prompt], gc)
    firsts = torch.tensor([o.generated_tokens[0] for o in outs])
    with torch.no_grad():
        logits = llama(torch.tensor([prompt])).logits[0, -1].float()
    probs = _reference_probs(logits, SamplingParams(do_sample=True, temperature=1.4, top_k=6))
    assert _chi_square_p(torch.bincount(firsts, minlength=VOCAB), probs, len(outs)) > 1e-4


def test_one_host_copy_and_one_sort_per_step(monkeypatch):
    """A batch mixing greedy, sampling, penalties, bans and log-probabilities: the sampler reads
    back once (Tensor.tolist), never per row (.item / .cpu / .numpy), and sorts once."""
    rows = [SamplingParams(), SamplingParams(do_sample=True, top_k=3, top_p=0.8, return_logprobs=True),
            SamplingParams(repetition_penalty=1.2, no_repeat_ngram_size=2, top_logprobs=2),
            SamplingParams(do_sample=True, temperature=0.5, min_p=0.1, bad_words_ids=((4,), (1, 2, 5))),
            SamplingParams(suppress_tokens=(3,), min_new_tokens=4, eos_token_ids=(7,))]
    reqs = [_request(p, tokens=(1, 2, 1, 2, 3)) for p in rows]
    calls = {"tolist": 0, "item": 0, "cpu": 0, "numpy": 0, "sort": 0}
    for name in ("tolist", "item", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k:
                            (calls.__setitem__(_n, calls[_n] + 1), _o(self, *a, **k))[1])
    original_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: (calls.__setitem__("sort", calls["sort"] + 1),
                                                        original_sort(*a, **k))[1])
    logits = torch.randn(len(reqs), 16, generator=torch.Generator().manual_seed(1))
    out = sampling.sample(logits, reqs, torch.Generator().manual_seed(0))
    assert calls == {"tolist": 1, "item": 0, "cpu": 0, "numpy": 0, "sort": 1}
    assert len(out) == 5 and out[3] != 4 and out[4] not in (3, 7)  # a bad word; suppressed and early EOS
    assert out[1].logprob <= 0 and len(out[2].top) == 2 and not hasattr(out[0], "logprob")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 70), levels=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.bfloat16]),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_argmax_rows_equals_torch_argmax(rows, vocab, levels, dtype, strided, seed):
    """The greedy read-back (numpy on the CPU for the dtypes numpy has, torch otherwise) takes
    the same token as torch.argmax, the first of tied maxima included (few distinct values
    make ties common), on strided rows (logits[sampling]) too."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (2 * rows if strided else rows, vocab), generator=g).to(dtype)
    if strided:
        logits = logits[::2]
    with torch.inference_mode():
        assert sampling.argmax_rows(logits) == torch.argmax(logits, dim=-1).tolist()


def test_argmax_rows_takes_nan_like_torch():
    logits = torch.tensor([[1.0, float("nan"), 5.0], [2.0, 7.0, 7.0]])
    assert sampling.argmax_rows(logits) == torch.argmax(logits, dim=-1).tolist() == [1, 1]


# ------------------------------------------------------------------ log-probabilities
def test_logprobs_equal_log_softmax_of_generate_scores(llama, prompts):
    gc = _gc(repetition_penalty=1.4, no_repeat_ngram_size=3, max_new_tokens=8)
    outs = Engine(llama, BatchConfig(backend="torch")).generate(prompts, gc, return_logprobs=True, top_logprobs=3)
    for p, o in zip(prompts, outs):
        ref = _generate(llama, p, gc, output_scores=True, return_dict_in_generate=True)
        assert o.generated_tokens == ref.sequences[0, len(p):].tolist()
        logp = [s[0].float().log_softmax(-1) for s in ref.scores]
        assert len(o.logprobs) == len(o.generated_tokens) == len(logp)
        expected = torch.stack([lp[t] for lp, t in zip(logp, o.generated_tokens)])
        torch.testing.assert_close(torch.tensor(o.logprobs), expected, atol=1e-4, rtol=0)
        for alternatives, lp in zip(o.top_logprobs, logp):
            top = lp.topk(3)
            assert [t for t, _ in alternatives] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in alternatives]), top.values, atol=1e-4, rtol=0)


def test_sampled_logprobs_are_those_of_the_warped_scores(llama, prompts):
    """For sampled tokens: the log-softmax of the scores after generate()'s warpers, recomputed
    by teacher forcing the tokens the engine chose."""
    gc = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, pad_token_id=0)
    outs = Engine(llama, BatchConfig(backend="torch", seed=3)).generate(prompts, gc, return_logprobs=True)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    for p, o in zip(prompts, outs):
        seq = p + o.generated_tokens
        with torch.no_grad():
            logits = llama(torch.tensor([seq])).logits[0].float()
        for step, token in enumerate(o.generated_tokens):
            scores = warpers(torch.tensor([seq[:len(p) + step]]), logits[len(p) + step - 1].unsqueeze(0).clone())
            assert abs(scores.log_softmax(-1)[0, token].item() - o.logprobs[step]) < 1e-4


def test_logprobs_are_off_unless_asked(llama, prompts):
    out = Engine(llama, BatchConfig(backend="torch")).generate(prompts[:1], _gc())[0]
    assert out.logprobs == [] and out.top_logprobs is None


# ------------------------------------------------------------------ num_return_sequences
@pytest.mark.parametrize("model_name", ["llama", "sliding_qwen2"])
@pytest.mark.parametrize("block_size", [4, 8])
def test_siblings_share_the_prompt_and_match_generate(llama, prompts, model_name, block_size):
    """top_k=1 sampling is the greedy choice (transformers refuses num_return_sequences > 1 with
    do_sample=False): every sibling equals generate(); the prompt is computed once."""
    model = llama if model_name == "llama" else tiny_sliding_qwen2(vocab=VOCAB, window=10)
    n, new = 3, 5
    gc = GenerationConfig(max_new_tokens=new, do_sample=True, top_k=1, num_return_sequences=n, pad_token_id=0)
    engine = Engine(model, BatchConfig(backend="torch", block_size=block_size, max_batch_tokens=16))
    outs = engine.generate(prompts, gc)
    ref = _reference(model, prompts, GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=0))
    assert [o.generated_tokens for o in outs] == [r for r in ref for _ in range(n)]
    assert [o.request_id for o in outs[:n]] == ["req-0", "req-0__child#0", "req-0__child#1"]
    # Each prompt of length L > 1: L - 1 tokens once, then its last token for each of the n
    # siblings; a one-token prompt has nothing to share. Then n * (new - 1) decode tokens.
    prefill = sum(len(p) - 1 + n if len(p) > 1 else n for p in prompts)
    assert engine.metrics()["computed_tokens"] == prefill + len(prompts) * n * (new - 1)
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    assert_pool_accounting(engine.cache)


def test_siblings_sample_distinct_sequences(llama, prompts):
    gc = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=0, num_return_sequences=4, pad_token_id=0)
    engine = Engine(llama, BatchConfig(backend="torch", seed=0))
    outs = engine.generate(prompts[2:3], gc)
    assert len(outs) == 4 and len({tuple(o.generated_tokens) for o in outs}) > 1
    assert all(o.prompt_ids == prompts[2] and len(o.generated_tokens) == 8 for o in outs)
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_cancelled_parent_or_sibling_before_the_fork(llama, prompts):
    """A sibling cancelled while it waits is skipped; the others still run (on their own when
    the request they waited for is cancelled first)."""
    gc = GenerationConfig(max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=3, pad_token_id=0)
    engine = Engine(llama, BatchConfig(backend="torch"))
    a = engine.add_request(prompts[3], gc)
    b = engine.add_request(prompts[2], gc)
    engine.cancel(f"{a}__child#1")
    engine.cancel(b)  # before any step: its siblings queue up on their own
    while engine.scheduler.has_work():
        engine.step()
    ref = _reference(llama, [prompts[3], prompts[2]], GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0))
    results = {rid: engine.pop_result(rid) for rid in engine.sequence_ids(a) + engine.sequence_ids(b)}
    assert results[f"{a}__child#1"].finish_reason == "cancelled" and results[b].finish_reason == "cancelled"
    assert results[a].generated_tokens == results[f"{a}__child#0"].generated_tokens == ref[0]
    assert results[f"{b}__child#0"].generated_tokens == results[f"{b}__child#1"].generated_tokens == ref[1]
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks

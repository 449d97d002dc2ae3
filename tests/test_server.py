"""`cbkernels serve` through the official openai client: one server for the session (an
in-process uvicorn on a free loopback port, API key on), the embedded SmolLM2 on a private
copy of the model. Greedy answers are compared with the engine's own output for the same
token ids (cbkernels.generate_batch with the same GenerationConfig)."""
import asyncio
import secrets

import httpx
import pytest

from cbkernels.server.testing import QUESTIONS, chat_ids, engine_greedy, engine_outputs, served_model

openai = pytest.importorskip("openai", reason="the server tests need the test extra (openai)")

API_KEY = "sk-test-" + secrets.token_hex(8)
MODEL = "smollm2-test"


@pytest.fixture(scope="session")
def served():
    with served_model(num_blocks=512, max_batch_tokens=512, max_num_seqs=32, model_name=MODEL, api_key=API_KEY,
                      max_waiting=32, max_body_bytes=1 << 20) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def finish_of(tokens, tok):
    return "stop" if tokens and tokens[-1] == tok.eos_token_id else "length"


def test_health_is_open_and_models_lists_the_served_name(served, client):
    assert httpx.get(served.base_url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_engine_output_with_usage(served, client, stream):
    tok, max_new = served.tokenizer, 24
    prompts = [chat_ids(tok, q) for q in QUESTIONS[:2]]
    expected = engine_greedy(prompts, max_new)
    for question, ids, ref in zip(QUESTIONS, prompts, expected):
        messages = [{"role": "user", "content": question}]
        if stream:
            chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_new,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert chunks[-1].choices == [] and len(finish) == 1
            usage, finish = chunks[-1].usage, finish[0]
        else:
            resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_new, temperature=0)
            assert resp.object == "chat.completion" and resp.model == MODEL
            text, finish, usage = resp.choices[0].message.content, resp.choices[0].finish_reason, resp.usage
        assert text == tok.decode(ref, skip_special_tokens=True)
        assert finish == finish_of(ref, tok)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(ref))
        assert usage.total_tokens == len(ids) + len(ref)


def test_completion_greedy_equals_engine_output_streamed_and_not(served, client):
    tok, max_new = served.tokenizer, 16
    prompt = "The three primary colours are"
    ref = engine_greedy([list(tok(prompt)["input_ids"])], max_new)[0]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_new, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_new, temperature=0, stream=True))
    assert whole.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason == finish_of(ref, tok)
    assert whole.usage.completion_tokens == len(ref)


def _stop_across_tokens(tok, tokens):
    """A stop string that begins inside one token's text and ends inside a later one's."""
    pieces = [tok.decode(tokens[:i], skip_special_tokens=True) for i in range(len(tokens) + 1)]
    for i in range(2, len(tokens) - 2):
        a, b, c = len(pieces[i - 1]), len(pieces[i]), len(pieces[i + 1])
        if b - a >= 2 and c - b >= 2 and pieces[-1][a + 1:c - 1].strip():
            return pieces[-1][a + 1:c - 1], pieces[-1]
    raise AssertionError("no token pair long enough for the test")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens_cuts_the_text(served, client, stream):
    tok, max_new = served.tokenizer, 32
    question = QUESTIONS[1]
    ref = engine_greedy([chat_ids(tok, question)], max_new)[0]
    stop, full = _stop_across_tokens(tok, ref)
    messages = [{"role": "user", "content": question}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=max_new, temperature=0, stop=[stop, "never-appears-xyz"])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        resp = client.chat.completions.create(**kwargs)
        text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
    assert text == full[:full.index(stop)] and stop not in text
    assert finish == "stop"
    # A stop string that never appears changes nothing.
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_new, temperature=0,
                                          stop="never-appears-xyz")
    assert resp.choices[0].message.content == full


def test_n_choices_greedy_and_sampled(served, client):
    tok, max_new = served.tokenizer, 12
    ref = engine_greedy([chat_ids(tok, QUESTIONS[0])], max_new)[0]
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_new, temperature=0, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert {c.message.content for c in resp.choices} == {tok.decode(ref, skip_special_tokens=True)}
    assert resp.usage.completion_tokens == 3 * len(ref) and resp.usage.prompt_tokens == len(chat_ids(tok, QUESTIONS[0]))
    sampled = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_new, temperature=1.0,
                                             n=4, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in sampled.choices}) > 1  # four draws, not one answer copied


def test_seed_reproduces_sampling_whatever_else_runs(served, client):
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=16, temperature=1.0, n=2)

    def texts(seed):
        return [c.message.content for c in client.chat.completions.create(seed=seed, **kw).choices]

    first = texts(1234)
    aclient = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def with_traffic():  # the same seeded request while unseeded sampling runs beside it
        noise = [aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=1.0)
                 for _ in range(3)]
        seeded = aclient.chat.completions.create(seed=1234, **kw)
        results = await asyncio.gather(seeded, *noise)
        await aclient.close()
        return [c.message.content for c in results[0].choices]

    assert asyncio.run(with_traffic()) == first
    assert texts(1234) == first
    assert texts(4321) != first


# Log-probabilities: the server's numbers are the engine's own for the same prompt. The engine
# reference runs the prompt alone while the server batches it with its siblings (n=2), so the
# fp32 sums may round differently: agreement to 1e-4 (the tokens themselves must be equal).
LOGPROB_TOL = 1e-4


def _check_chat_logprobs(content, ref, tok, text, k):
    eos = tok.eos_token_id
    assert len(content) == len(ref.generated_tokens)
    for item, token, lp, top in zip(content, ref.generated_tokens, ref.logprobs, ref.top_logprobs):
        assert item.logprob == pytest.approx(lp, abs=LOGPROB_TOL)
        assert len(item.top_logprobs) == k
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for _, v in top], abs=LOGPROB_TOL)
        # greedy: the chosen token is the most likely one
        assert (item.top_logprobs[0].token, item.top_logprobs[0].bytes) == (item.token, item.bytes)
        assert item.top_logprobs[0].logprob == item.logprob
        assert item.token == tok.decode([token]) or token == eos or "\ufffd" in item.token
    words = [item for item, token in zip(content, ref.generated_tokens) if token != eos]
    assert bytes(b for item in words for b in item.bytes).decode("utf-8") == text


def test_chat_logprobs_are_the_engines_with_n_choices_streamed_and_not(served, client):
    tok, max_new, k = served.tokenizer, 10, 3
    ids = chat_ids(tok, QUESTIONS[2])
    ref = engine_outputs([ids], max_new, top_logprobs=k)[0]
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=max_new,
                  temperature=0, n=2, logprobs=True, top_logprobs=k)
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        content = [item for c in mine if c.logprobs for item in c.logprobs.content]
        _check_chat_logprobs(content, ref, tok, "".join(c.delta.content or "" for c in mine), k)
    resp = client.chat.completions.create(**kwargs)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        _check_chat_logprobs(choice.logprobs.content, ref, tok, choice.message.content, k)
    assert resp.usage.completion_tokens == 2 * len(ref.generated_tokens)
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None, "n": 1})
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_are_the_engines_streamed_and_not(served, client):
    tok, max_new, k = served.tokenizer, 10, 2
    prompt = "The three primary colours are"
    ref = engine_outputs([list(tok(prompt)["input_ids"])], max_new, top_logprobs=k)[0]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=max_new, temperature=0, logprobs=k)
    parts = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)]
    lps = [p.logprobs for p in parts if p.logprobs]
    streamed = ("".join(p.text for p in parts), [t for lp in lps for t in lp.tokens],
                [v for lp in lps for v in lp.token_logprobs], [t for lp in lps for t in lp.top_logprobs],
                [o for lp in lps for o in lp.text_offset])
    choice = client.completions.create(**kwargs).choices[0]
    lp = choice.logprobs
    whole = (choice.text, lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset)
    for text, tokens, values, tops, offsets in (streamed, whole):
        assert tokens == [tok.decode([t]) for t in ref.generated_tokens]
        assert values == pytest.approx(ref.logprobs, abs=LOGPROB_TOL)
        for token, value, top, alts in zip(tokens, values, tops, ref.top_logprobs):
            assert len(top) == k and max(top, key=top.get) == token and top[token] == value
            assert sorted(top.values(), reverse=True) == pytest.approx([v for _, v in alts], abs=LOGPROB_TOL)
        assert [text[o:o + len(t)] for o, t in zip(offsets, tokens)] == tokens


def test_sampled_choices_carry_their_own_logprobs(served, client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[3]}],
                                          max_tokens=8, temperature=1.0, n=3, logprobs=True, top_logprobs=5)
    counts = []
    for choice in resp.choices:
        content = choice.logprobs.content
        counts.append(len(content))
        for item in content:  # the drawn token is no likelier than the most likely one
            assert item.logprob <= item.top_logprobs[0].logprob and len(item.top_logprobs) == 5
            assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs),
                                                                     reverse=True)
    assert sum(counts) == resp.usage.completion_tokens


def test_api_key_is_required_on_v1_and_metrics(served):
    url = served.base_url
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.get(url + path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_are_prometheus_text(served, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert httpx.get(served.base_url + "/v1/models").status_code == 401
    r = httpx.get(served.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("cbkernels_requests_running", "cbkernels_requests_waiting", "cbkernels_time_to_first_token_seconds",
                 "cbkernels_inter_token_latency_seconds", "cbkernels_generation_tokens", "cbkernels_cache_occupancy_ratio",
                 "cbkernels_prefix_cache_hit_ratio", "cbkernels_preemptions", "cbkernels_http_requests"):
        assert name in families, name
    assert families["cbkernels_time_to_first_token_seconds"].type == "histogram"
    gen = [s.value for s in families["cbkernels_generation_tokens"].samples if s.name.endswith("_total")]
    assert gen and gen[0] >= 4
    statuses = {s.labels["status"] for s in families["cbkernels_http_requests"].samples if s.name.endswith("_total")}
    assert {"200", "401"} <= statuses
